import csv

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.data.transforms import dihedral_views
from alldetect.errors import AlldetectError
from alldetect.inference.explain import ensemble_cam, member_cams
from alldetect.inference.predict import collect_inputs, predict_rows
from alldetect.inference.torch_engine import TorchEngine
from helpers import write_cell

runner = CliRunner()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model(ensemble_dir):
    return TorchEngine.from_folder(ensemble_dir, device="cpu")


def _crops(n=3, side=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def test_cam_shapes_ranges_and_the_weighted_ensemble_map(model):
    crops = _crops()
    cams = member_cams(model, crops, [1, 0, 1])
    assert cams.shape == (2, 3, 64, 64)
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    w = model.cam_weights
    combined = ensemble_cam(cams, w)
    np.testing.assert_allclose(combined, (w[0] * cams[0] + w[1] * cams[1]) / w.sum(), rtol=1e-6)


def test_tta_is_invariant_for_a_rotation_symmetric_cell(model):
    yy, xx = np.mgrid[0:64, 0:64]
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 20 ** 2)[..., None]
    cell = (disc * np.array([90, 30, 110])).astype(np.uint8)[None]
    plain = model.member_probs(cell)
    tta = model.member_probs(cell, tta=True)
    np.testing.assert_allclose(tta, plain, atol=1e-5)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert len({tuple(v.flatten().tolist()) for v in dihedral_views(x)}) == 8


def test_predict_writes_members_patients_and_error_rows(model, tmp_path):
    for subject, label, n in (("7", "all", 3), ("H7", "hem", 2)):
        for i in range(n):
            write_cell(tmp_path / "cells" / f"UID_{subject}_1_{i + 1}_{label}.png", size=80)
    (tmp_path / "cells" / "UID_7_2_1_all.png").write_bytes(b"broken")
    write_cell(tmp_path / "cells" / "UID_7_3_1_all.png", size=40)  # smaller than the crop
    out = tmp_path / "preds.csv"
    assert predict_rows(model, collect_inputs([tmp_path / "cells"]), out, tta=True).scored == 5
    assert {r["model"] for r in _rows(out)} == {"wen_kappa+tta"}
    summary = predict_rows(model, collect_inputs([tmp_path / "cells"]), out,  # as fitted: without TTA
                           domain_check=False)  # discs on black are not cells: test_domain checks that
    assert summary.scored == 5 and summary.failed == 2
    rows = _rows(out)
    assert {r["model"] for r in rows} == {"wen_kappa"}
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["error"]}
    assert "not an image" in errors["UID_7_2_1_all.png"] and "smaller than the 64x64" in errors["UID_7_3_1_all.png"]
    good = [r for r in rows if not r["error"]]
    for r in good:
        members = np.array([float(r["prob_mobilenet"]), float(r["prob_efficientnet_lite0"])])
        w = np.array(model.combiner.weights)
        assert float(r["prob_all"]) == pytest.approx(w @ members / w.sum(), abs=1e-6)
    patients = {p["subject"]: p for p in summary.patients}
    assert patients["7"]["cells"] == 3 and patients["H7"]["cells"] == 2
    probs_7 = [float(r["prob_all"]) for r in good if r["subject"] == "7"]
    assert patients["7"]["mean_prob_all"] == pytest.approx(np.mean(probs_7), abs=1e-6)
    assert patients["7"]["call"] == ("all" if np.mean(probs_7) >= 0.5 else "hem")


def test_predict_cli_exit_status_and_submission_file(ensemble_dir, tmp_path):
    final = tmp_path / "testing_data" / "C-NMC_test_final_phase_data"
    for n in (1, 2, 10):
        write_cell(final / f"{n}.bmp", size=80)
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(tmp_path / "testing_data"), "-o",
                            str(tmp_path / "p.csv"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "p.submission.txt").read_text().splitlines()
    assert len(lines) == 3 and set(lines) <= {"0", "1"}
    (final / "3.bmp").write_bytes(b"")
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(final), "-o", str(tmp_path / "q.csv"),
                            "--device", "cpu"])
    assert r.exit_code == 1 and "1 failed" in r.output


def test_explain_cli_writes_the_grid(ensemble_dir, tmp_path):
    paths = [write_cell(tmp_path / f"UID_1_1_{i}_all.png", size=80) for i in (1, 2)]
    r = runner.invoke(app, ["explain", str(ensemble_dir), *map(str, paths), "-o", str(tmp_path / "cam"),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cam" / "gradcam_grid.png").stat().st_size > 10_000
    assert len(list((tmp_path / "cam").glob("UID_1_1_1_all_*.png"))) == 3  # two members and the ensemble


def test_ensemble_spec_that_does_not_match_the_code_is_a_clear_error(ensemble_dir, tmp_path):
    import json
    import shutil

    broken = tmp_path / "ens"
    shutil.copytree(ensemble_dir, broken)
    spec = json.loads((broken / "ensemble.json").read_text())
    spec["members"][0]["name"], spec["members"][1]["name"] = "efficientnet_lite0", "mobilenet"  # weights swapped
    (broken / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(AlldetectError, match="does not match the installed efficientnet_lite0"):
        TorchEngine.from_folder(broken, device="cpu")
    spec["version"] = 99
    (broken / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(AlldetectError, match="version 99 is not one this alldetect reads"):
        TorchEngine.from_folder(broken, device="cpu")


@pytest.mark.parametrize("name", ["vgg16", "xception", "mobilenet", "inception_resnet_v2", "densenet121"])
def test_cam_layer_is_spatial_at_the_paper_input_size(name, real_cells):
    """At 300x300 every member's Grad-CAM layer still has a spatial map (>= 8x8) and gives a valid CAM."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from alldetect.data.images import read_rgb
    from alldetect.data.geometry import center_crop
    from alldetect.models import create_member

    member = create_member(name).eval()
    shapes = []
    handle = member.cam_layers[0].register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    cell = center_crop(read_rgb(next((real_cells / "bmp" / "all").glob("*.bmp")))[0], 300)
    x = torch.from_numpy(cell.copy()).permute(2, 0, 1)[None].float() / 255
    with GradCAM(model=member, target_layers=member.cam_layers) as cam:
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])
    handle.remove()
    assert min(shapes[0][-2:]) >= 8, shapes[0]
    assert grayscale.shape == (1, 300, 300) and np.isfinite(grayscale).all()
    assert grayscale.min() >= 0 and grayscale.max() <= 1 + 1e-6
