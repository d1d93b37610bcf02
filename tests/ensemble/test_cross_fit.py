"""Cross-fitting: every donor trains, every donor is scored out of fold by the one model that did not train on
it, the combiners and operating point are fitted on those out-of-fold scores, and the folder ships each member
as the average of its fold models, used as such by predict, serve, export and the report."""

import io
import json
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from alldetect import pipeline
from alldetect.data.split import default_folds, fold_splits, subject_folds
from alldetect.data.synth import SynthConfig
from alldetect.ensemble.build import build_ensemble
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.errors import DataError
from alldetect.evaluation.operating_point import fit_operating_point
from alldetect.formats.manifest import ManifestRow, read_manifest
from alldetect.formats.predictions import read_predictions
from alldetect.models import create_member
from alldetect.models.folds import FoldAverage
from alldetect.models.runtime import score_members
from alldetect.pipeline import PipelineConfig, run_pipeline
from alldetect.training.config import Profile

from helpers import history_steps, kill_when_written, run_command

TINY = SynthConfig(size=96, all_subjects=4, hem_subjects=2, test_all_subjects=1, test_hem_subjects=1,
                   final_subjects=1, cells_per_subject=4)
MEMBERS = ("mobilenet", "efficientnet_lite0")


@pytest.fixture(scope="module")
def cross_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross-fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "DEMO_SYNTH", TINY)
        patch.setattr(pipeline, "DEMO_CROP", 64)
        run_pipeline(PipelineConfig(out=str(out), profile=Profile.plus, members=MEMBERS, folds=2, epochs=1,
                                    batch_size=8, input_size=32, pretrained=False, device="cpu", bootstrap=20))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), min_size=4, max_size=30), st.integers(0, 99))
def test_every_donor_is_held_out_once_and_never_trains_the_model_that_scores_it(donors, seed):
    rows = [ManifestRow(path=f"{d}_{c}.png", label="all" if is_all else "hem", subject=f"{'' if is_all else 'H'}{d}")
            for d, (is_all, cells) in enumerate(donors) for c in range(cells)]
    classes = {r.label for r in rows}
    if classes != {"all", "hem"} or min(sum((r.label == k) for r in rows if r.path.endswith("_0.png"))
                                        for k in classes) < 2:
        with pytest.raises(DataError):
            default_folds(rows)
        return
    k = default_folds(rows)
    assert 2 <= k <= 5
    folds = subject_folds(rows, k, seed=seed)
    held_out = []
    for fold in range(k):
        manifest = fold_splits(rows, folds, fold)
        val = {r.subject for r in manifest if r.split == "val"}
        train = {r.subject for r in manifest if r.split == "train"}
        assert not val & train and val | train == {r.subject for r in rows}
        assert {r.label for r in manifest if r.split == "val"} == {"all", "hem"}  # a healthy donor in every fold
        held_out += sorted(val)
    assert sorted(held_out) == sorted({r.subject for r in rows})  # each donor out of fold exactly once


def test_cross_fit_trains_every_member_on_every_fold_and_scores_each_donor_out_of_fold(cross_fit):
    spec = EnsembleFolder(cross_fit / "ensemble").spec
    assert spec.cross_fitted and [m.folds for m in spec.members] == [2, 2]
    donors = {r.subject for r in read_manifest(cross_fit / "manifest.csv") if r.label}
    oof = read_predictions(cross_fit / "ensemble" / "predictions_val.csv")[spec.default_method]
    assert set(oof.subject) == donors and len(set(oof.path)) == len(oof.path)
    assert not (cross_fit / "ensemble" / "predictions_test.csv").exists()  # no donor was held back
    columns = _member_columns(cross_fit / "ensemble" / "predictions_val.csv")
    for entry in spec.members:
        for k, (weights, sha256) in enumerate(zip(entry.weights, entry.sha256)):
            fold_manifest = read_manifest(cross_fit / "folds" / f"fold{k}.csv")
            held = {r.path for r in fold_manifest if r.split == "val"}
            trained = {r.subject for r in fold_manifest if r.split == "train"}
            assert not {s for p, s in zip(oof.path, oof.subject) if p in held} & trained
            # the stored out-of-fold score of a held-out cell is the one its own fold model gives it (with TTA)
            model = EnsembleFolder(cross_fit / "ensemble").load_member(replace(entry, weights=[weights],
                                                                               sha256=[sha256])).eval()
            path = sorted(held)[0]
            crop = _crop(path, spec)
            score = score_members([model], crop, device=torch.device("cpu"), precision="fp32", tta=True)[0, 0]
            assert columns[entry.name][path] == pytest.approx(score, abs=1e-6)


def test_operating_point_and_combiners_are_fitted_on_out_of_fold_predictions_only(cross_fit):
    ens = cross_fit / "ensemble"
    spec = EnsembleFolder(ens).spec
    oof = read_predictions(ens / "predictions_val.csv")
    for method in ("wen_kappa", "stacking"):
        p = oof[method]
        stored = spec.operating_point(method)
        refit = fit_operating_point(p.y, p.prob_all, p.subject, fitted_on=stored.fitted_on)
        assert replace(stored, cell_threshold=0, patient_threshold=0) == replace(refit, cell_threshold=0,
                                                                                 patient_threshold=0)
        # the same thresholds, up to the digits the predictions file keeps
        assert (stored.cell_threshold, stored.patient_threshold) == pytest.approx(
            (refit.cell_threshold, refit.patient_threshold), abs=1e-6)
    assert spec.operating_point().criterion == "balanced_accuracy"
    assert "out-of-fold predictions of" in spec.operating_point().fitted_on
    members = np.stack([oof[m.name].prob_all for m in spec.members])
    assert oof[spec.default_method].prob_all == pytest.approx(spec.fit(spec.default_method).apply(members))


def test_fold_average_is_the_mean_of_its_fold_models_probabilities():
    torch.manual_seed(0)
    folds = [create_member("mobilenet").eval() for _ in range(3)]
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(1) for m in folds]).mean(0)
        assert FoldAverage(folds)(x).softmax(1) == pytest.approx(expected, abs=1e-6)
    assert len(FoldAverage(folds).cam_layers) == 3


def test_fold_averaged_members_export_to_onnx_and_score_as_in_torch(cross_fit, tmp_path):
    """A cross-fitted member in the graph: the average of its fold models (the whole ensemble's export and its
    record in the spec: tests/export)."""
    from alldetect.ensemble.combiners import SAP
    from alldetect.export.graph import export_onnx
    from alldetect.inference.onnx_engine import onnx_session
    from alldetect.inference.torch_engine import TorchEngine

    model = TorchEngine.from_folder(cross_fit / "ensemble", device="cpu", precision="fp32")
    mobilenet = replace(model, members=model.members[:1], combiner=SAP([1.0]))  # one member: less to export
    assert isinstance(mobilenet.members[0], FoldAverage) and len(mobilenet.members[0].folds) == 2
    crops = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    _, graph_members = onnx_session(export_onnx(mobilenet, tmp_path / "folds.onnx")).run(None, {"images": crops})
    assert graph_members.T == pytest.approx(mobilenet.member_probs(crops), abs=1e-4)


def test_fold_runs_that_validate_the_same_donor_are_refused(cross_fit, tmp_path):
    mobilenet = cross_fit / "members" / "mobilenet"
    twin = tmp_path / "fold0-again"
    shutil.copytree(mobilenet / "fold0", twin)
    lite = cross_fit / "members" / "efficientnet_lite0"
    with pytest.raises(DataError, match="validated by both"):
        build_ensemble([mobilenet / "fold0", twin, lite / "fold0", lite / "fold1"], tmp_path / "ens")


def test_predict_serve_evaluate_and_report_call_by_the_stored_operating_point(cross_fit, tmp_path):
    from fastapi.testclient import TestClient

    from alldetect.cli import app
    from alldetect.inference.load import load_engine
    from alldetect.inference.predict import collect_inputs, predict_rows
    from alldetect.serve import ServeSettings, create_app
    from typer.testing import CliRunner

    ens = cross_fit / "ensemble"
    folder = EnsembleFolder(ens)
    spec = folder.spec
    strict = replace(spec.operating_point(), cell_threshold=0.999, patient_threshold=0.001)
    spec.operating_points = {**spec.operating_points, spec.default_method: strict}
    folder.save_spec(spec)
    cells = sorted((cross_fit / "data").rglob("*_all.bmp"))[:4]
    engine = load_engine(ens, device="cpu", engine="torch")
    scored = predict_rows(engine, collect_inputs(cells), tmp_path / "p.csv")
    probs = read_predictions(tmp_path / "p.csv")
    prob = next(iter(probs.values())).prob_all
    assert scored.operating_point == strict
    assert len(scored.flagged) == int((prob >= 0.999).sum())
    assert all(p["call"] == "all" for p in scored.patients)  # patient threshold 0.001
    cli = CliRunner().invoke(app, ["predict", str(ens), *map(str, cells), "-o", str(tmp_path / "q.csv"),
                                   "--engine", "torch", "--device", "cpu"])
    assert cli.exit_code == 0 and "a cell is ALL at P(ALL) >= 0.999" in cli.output

    client = TestClient(create_app(ens, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu",
                                                      engine="torch")))
    assert client.get("/api/model").json()["threshold"] == 0.999
    upload = [("files", (c.name, _png_bytes(c))) for c in cells]
    answer = client.post("/api/predict", files=upload).json()
    assert answer["threshold"] == 0.999
    assert [c["call"] for c in answer["cells"]] == ["ALL" if c["prob_all"] >= 0.999 else "HEM" for c in answer["cells"]]
    assert all(p["call"] == "all" for p in answer["patients"])

    evaluated = CliRunner().invoke(app, ["evaluate", str(ens / "predictions_val.csv"), "--ensemble", str(ens),
                                         "--json"])
    assert json.loads(evaluated.output)[spec.default_method]["threshold"] == 0.999

    from alldetect.report.build import make_report

    text = make_report(ens, n_boot=20).read_text()
    assert "scored out of fold" in text and "## Shipped operating point" in text and "0.999" in text


def test_killed_cross_fit_resumes_the_interrupted_fold_exactly(tmp_path):
    """A real `alldetect run --folds 2` process, SIGKILLed while training the second fold model, then rerun."""
    command = run_command(TINY, 64, ["run", "--profile", "plus", "--folds", "2", "--members",
                                     "mobilenet,efficientnet_lite0", "--no-pretrained", "--input-size", "32",
                                     "--epochs", "2", "--batch-size", "4", "--bootstrap", "20", "--device", "cpu"],
                          tmp_path)
    kill_when_written(command, tmp_path / "members" / "mobilenet" / "fold1" / "checkpoints" / "last.pt")
    first_done = (tmp_path / "members" / "mobilenet" / "fold0" / "metrics.json").stat().st_mtime_ns
    assert json.loads((tmp_path / "stages.json").read_text())["train mobilenet fold1"]["done"] is False

    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "members" / "mobilenet" / "fold0" / "metrics.json").stat().st_mtime_ns == first_done
    steps = history_steps(tmp_path / "members" / "mobilenet" / "fold1")
    assert steps == list(range(len(steps)))  # resumed: no step lost, none repeated
    assert EnsembleFolder(tmp_path / "ensemble").spec.cross_fitted


def _member_columns(path) -> dict[str, dict[str, float]]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [c.removeprefix("prob_") for c in rows[0] if c.startswith("prob_") and c != "prob_all"]
    return {n: {r["path"]: float(r[f"prob_{n}"]) for r in rows} for n in names}


def _crop(path: str, spec) -> np.ndarray:
    from alldetect.data.images import read_rgb

    return spec.preprocess.apply(read_rgb(path)[0], name=path)[None]


def _png_bytes(path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_call_column_of_predict_the_web_page_and_the_api_agree_at_the_fitted_point(cross_fit, tmp_path):
    """A cross-fitted ensemble whose cell threshold is not 0.5 (moved between two cells' probabilities, so that
    the 0.5 rule would call them otherwise): the predictions CSV, the web page's JSON and ``alldetect.load`` give
    every cell the same call, the one the stored point gives."""
    import csv

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    import alldetect
    from alldetect.cli import app
    from alldetect.serve import ServeSettings, create_app

    ens = tmp_path / "ensemble"
    shutil.copytree(cross_fit / "ensemble", ens)
    cells = sorted((cross_fit / "data").rglob("*.bmp"))[::3][:8]
    prob = np.sort(alldetect.load(ens, engine="torch", device="cpu").predict(cells)["prob_all"])
    gaps = [(a + b) / 2 for a, b in zip(prob, prob[1:]) if a < b]
    threshold = next(t for t in gaps if (prob >= t).sum() != (prob >= 0.5).sum())
    folder = EnsembleFolder(ens)
    spec = folder.spec
    spec.operating_points = {**spec.operating_points, spec.default_method: replace(
        spec.operating_point(), cell_threshold=float(threshold))}
    folder.save_spec(spec)

    done = CliRunner().invoke(app, ["predict", str(ens), *map(str, cells), "-o", str(tmp_path / "p.csv"),
                                    "--engine", "torch", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    with open(tmp_path / "p.csv", newline="") as f:
        written = list(csv.DictReader(f))
    client = TestClient(create_app(ens, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu",
                                                      engine="torch")))
    served = client.post("/api/predict", files=[("files", (c.name, _png_bytes(c))) for c in cells]).json()["cells"]
    table = alldetect.load(ens, engine="torch", device="cpu").predict(cells)

    expected = ["OUTSIDE" if r["in_domain"] == "no" else "ALL" if float(r["prob_all"]) >= threshold else "HEM"
                for r in written]
    assert [r["call"] for r in written] == expected
    assert [c["call"] for c in served] == expected
    assert table["call"] == expected
    assert table["prob_all"] == pytest.approx([float(r["prob_all"]) for r in written], abs=1e-6)
    assert threshold != 0.5
