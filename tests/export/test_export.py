import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.errors import AlldetectError
from alldetect.inference.explain import ensemble_cam, member_cams
from alldetect.inference.load import load_engine
from alldetect.inference.onnx_engine import OnnxEngine
from alldetect.inference.predict import collect_inputs, load_crops_for, predict_rows
from alldetect.inference.torch_engine import TorchEngine
from alldetect.serve import ServeSettings, create_app

from helpers import write_cell

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(ensemble_dir, tmp_path_factory):
    ens = tmp_path_factory.mktemp("exported") / "ens"
    shutil.copytree(ensemble_dir, ens)
    r = runner.invoke(app, ["export", str(ens)])
    assert r.exit_code == 0, r.output
    return ens


def test_onnx_matches_pytorch_within_1e_4(exported):
    torch_model = TorchEngine.from_folder(exported, device="cpu", precision="fp32")
    onnx_model = OnnxEngine.from_folder(exported)
    crops = np.random.default_rng(0).integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)  # odd batch: dynamic
    for tta in (False, True):
        (e_t, m_t), (e_o, m_o) = torch_model.predict(crops, tta=tta), onnx_model.predict(crops, tta=tta)
        np.testing.assert_allclose(e_o, e_t, atol=1e-4)
        np.testing.assert_allclose(m_o, m_t, atol=1e-4)
    graph_prob, graph_members = onnx_model.session.run(None, {"images": crops})  # the graph's own combiner
    np.testing.assert_allclose(graph_prob, torch_model.predict(crops)[0], atol=1e-4)
    np.testing.assert_allclose(graph_members.T, torch_model.member_probs(crops), atol=1e-4)
    for method in ("sap", "ts_sap", "stacking"):  # the combiners inside the graph, through the python side
        a = TorchEngine.from_folder(exported, method=method, device="cpu", precision="fp32").predict(crops)[0]
        b = OnnxEngine.from_folder(exported, method=method).predict(crops)[0]
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_auto_engine_picks_the_fastest_accurate_one(exported, ensemble_dir, tmp_path):
    from alldetect.inference.torch_engine import TorchEngine
    from alldetect.precision import cpu_has_native_bf16

    def engine(ens, **kw):
        chosen = load_engine(ens, device="cpu", **kw)
        return type(chosen).__name__, chosen.precision

    assert engine(exported) == ("OnnxEngine", "int8")
    assert engine(exported, engine="onnx") == ("OnnxEngine", "int8")
    assert engine(exported, precision="fp32") == ("OnnxEngine", "fp32")
    assert engine(exported, engine="onnx", precision="fp32") == ("OnnxEngine", "fp32")
    assert engine(exported, precision="bf16") == ("TorchEngine", "bf16")
    fp32_only = tmp_path / "fp32-only"
    shutil.copytree(exported, fp32_only, ignore=shutil.ignore_patterns("*.int8.onnx"))
    assert isinstance(load_engine(fp32_only, device="cpu"), TorchEngine) == cpu_has_native_bf16()
    assert not isinstance(load_engine(ensemble_dir, device="cpu"), OnnxEngine)
    with pytest.raises(AlldetectError, match="alldetect export"):
        load_engine(ensemble_dir, engine="onnx")
    with pytest.raises(AlldetectError, match="alldetect export"):
        load_engine(fp32_only, precision="int8")
    with pytest.raises(AlldetectError, match="int8 runs on the onnx engine"):
        load_engine(exported, engine="torch", precision="int8")


def test_int8_graph_is_quantised_calibrated_on_validation_and_close_to_fp32(exported):
    import onnx

    from alldetect.ensemble.folder import EnsembleFolder
    from alldetect.formats.predictions import read_predictions

    graph = onnx.load(str(exported / "ensemble.int8.onnx"))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [init for init in graph.graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 50  # every conv of MobileNet and EfficientNet-Lite0
    assert {p.key: p.value for p in graph.metadata_props}["alldetect.precision"] == "int8"

    crops, labels = EnsembleFolder(exported).calibration()
    val = next(iter(read_predictions(exported / "predictions_val.csv").values()))
    assert len(crops) == len(val.path) and sorted(labels.tolist()) == sorted(val.y.tolist())
    fp32 = OnnxEngine.from_folder(exported, precision="fp32").predict(crops)[0]
    int8 = OnnxEngine.from_folder(exported, precision="int8").predict(crops)[0]
    assert np.abs(int8 - fp32).mean() < 0.02, np.abs(int8 - fp32).mean()


def test_int8_export_needs_its_calibration_cells(exported, tmp_path):
    """(``export --no-int8`` of such a folder: the moved-folder test in tests/ensemble.)"""
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved, ignore=shutil.ignore_patterns("*.onnx", "calibration.npz"))
    r = runner.invoke(app, ["export", str(moved)])
    assert r.exit_code != 0 and "calibration.npz: not found" in r.output and "--calibration" in r.output
    assert not (moved / "ensemble.onnx").exists()  # checked before the export


def test_predict_with_both_engines_agrees(exported, tmp_path):
    for i in range(3):
        write_cell(tmp_path / "cells" / f"UID_5_1_{i + 1}_all.png", size=80)
    for engine in ("onnx", "torch"):
        r = runner.invoke(app, ["predict", str(exported), str(tmp_path / "cells"), "--engine", engine, "-o",
                                str(tmp_path / f"{engine}.csv"), "--device", "cpu", "--precision", "fp32"])
        assert r.exit_code == 0, r.output
    from alldetect.formats.predictions import read_predictions

    a = read_predictions(tmp_path / "onnx.csv")["wen_kappa"].prob_all
    b = read_predictions(tmp_path / "torch.csv")["wen_kappa"].prob_all
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_web_app_serves_the_onnx_graph_when_exported(exported, ensemble_dir, tmp_path):
    def engine_of(ens):
        app = create_app(ens, ServeSettings(db_path=str(tmp_path / "p.sqlite"), device="cpu"))
        return TestClient(app).get("/api/model").json()["engine"]

    assert engine_of(exported) == "OnnxEngine"
    assert engine_of(ensemble_dir) == "TorchEngine"


def test_a_member_that_int8_moves_too_far_stays_fp32(exported, tmp_path):
    import onnx

    from alldetect.ensemble.folder import EnsembleFolder
    from alldetect.export.quantize import quantize_ensemble, quantize_graph

    ens = tmp_path / "ens"
    shutil.copytree(exported, ens, ignore=shutil.ignore_patterns("*.int8.onnx"))
    model = TorchEngine.from_folder(ens, device="cpu", precision="fp32")
    crops, labels = EnsembleFolder(ens).calibration()
    fp32 = OnnxEngine.from_folder(ens, precision="fp32").member_probs(crops)
    every = quantize_graph(ens / "ensemble.onnx", tmp_path / "every-member.int8.onnx", crops)
    drift = np.abs(OnnxEngine.from_folder(ens, path=every).member_probs(crops) - fp32).mean(axis=1)
    worst = int(np.argmax(drift))
    assert drift.min() < drift.max()
    summary = quantize_ensemble(ens, ens / "ensemble.onnx", model, crops, labels, tolerance=float(drift.mean()))
    assert summary.float_members == [model.names[worst]]
    int8 = OnnxEngine.from_folder(ens, precision="int8").member_probs(crops)
    np.testing.assert_allclose(int8[worst], fp32[worst], atol=1e-5)  # untouched
    assert np.abs(int8[1 - worst] - fp32[1 - worst]).mean() > 0  # quantised
    graph = onnx.load(str(ens / "ensemble.int8.onnx"))
    quantised = {init.name.split(".")[1] for init in graph.graph.initializer
                 if init.data_type == onnx.TensorProto.INT8 and init.name.startswith("members.")}
    assert quantised == {str(1 - worst)}

    assert quantize_ensemble(ens, ens / "ensemble.onnx", model, crops, tolerance=0.0) is None
    assert not (ens / "ensemble.int8.onnx").exists()


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # raised inside torch.export
def test_a_single_network_graph_quantises_too(tmp_path):
    """The benchmark quantises each member's own graph (logits out, no ensemble outputs)."""
    import onnx
    import torch

    from alldetect.models import create_member
    from alldetect.export.quantize import quantize_graph

    member = create_member("mobilenet").eval()
    path = tmp_path / "mobilenet.onnx"
    torch.onnx.export(member, (torch.zeros(2, 3, 64, 64, dtype=torch.uint8),), dynamo=True,
                      input_names=["images"], output_names=["logits"], verbose=False).save(str(path))
    crops = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)  # two batches of two
    int8 = quantize_graph(path, tmp_path / "mobilenet.int8.onnx", crops, batch_size=2)
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(int8)).graph.node}


def test_a_replaced_graph_is_refused_naming_the_file(exported, tmp_path):
    ens = tmp_path / "ens"
    shutil.copytree(exported, ens)
    assert set(EnsembleFolder(ens).spec.graphs) == {"ensemble.onnx", "ensemble.int8.onnx"}
    shutil.copyfile(ens / "ensemble.int8.onnx", ens / "ensemble.onnx")  # a valid graph with the same members
    with pytest.raises(AlldetectError, match="ensemble.onnx: the graph does not match the hash"):
        OnnxEngine.from_folder(ens)
    cell = write_cell(tmp_path / "UID_5_1_1_all.png", size=80)
    r = runner.invoke(app, ["predict", str(ens), str(cell), "--engine", "onnx", "--precision", "fp32", "-o",
                            str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and "does not match the hash" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p.csv").exists()


def test_a_replaced_graph_whose_hash_entry_was_deleted_is_refused(exported, tmp_path, caplog):
    """A folder that records hashes does not fall back to trust when one graph's entry is missing; only a folder
    written before graph hashes existed (no "graphs" field and no domain hash, which came later) is warned about."""
    import json

    ens = tmp_path / "ens"
    shutil.copytree(exported, ens)
    shutil.copyfile(ens / "ensemble.int8.onnx", ens / "ensemble.onnx")
    spec = json.loads((ens / "ensemble.json").read_text())
    del spec["graphs"]["ensemble.onnx"]
    (ens / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(AlldetectError, match="ensemble.onnx: no hash of this graph is recorded"):
        OnnxEngine.from_folder(ens)
    del spec["graphs"], spec["domain"]  # as an alldetect before graph hashes wrote it
    (ens / "ensemble.json").write_text(json.dumps(spec))
    OnnxEngine.from_folder(ens)
    assert "no hash of this graph is recorded" in caplog.text


def test_a_graph_that_preprocesses_otherwise_than_the_spec_is_refused(exported, tmp_path):
    from alldetect.export.graph import graph_metadata, set_graph_metadata

    graph = tmp_path / "other.onnx"
    shutil.copyfile(exported / "ensemble.onnx", graph)
    meta = graph_metadata(graph)
    assert json.loads(meta["preprocess"]) == EnsembleFolder(exported).spec.preprocess.to_json()
    set_graph_metadata(graph, meta | {"preprocess": json.dumps({"crop": 64, "input_size": 32})})
    with pytest.raises(AlldetectError, match="other.onnx: expects .*input_size=32.*export it again"):
        OnnxEngine.from_folder(exported, path=graph)


def test_the_spec_is_read_once_by_the_web_app_and_once_by_predict(exported, tmp_path, monkeypatch):
    """ensemble.json is read and validated once per process that loads the ensemble: serving and `predict` each
    read it once, with Grad-CAM too (which loads the torch members beside the ONNX engine)."""
    import builtins
    import io
    import os
    from dataclasses import replace

    ens = shutil.copytree(exported, tmp_path / "ens")
    folder = EnsembleFolder(ens)
    spec = folder.spec
    spec.operating_points = {m: replace(spec.operating_point(m), cell_threshold=0.0) for m in spec.methods}
    folder.save_spec(spec)  # every cell is called ALL, so `predict --cam` draws each one
    reads = []
    real_open = io.open

    def counting_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("ensemble.json") and "r" in mode:
            reads.append(file)
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open

    def counting_os_open(file, flags, *args, **kwargs):
        if str(file).endswith("ensemble.json") and not flags & (os.O_WRONLY | os.O_RDWR):
            reads.append(file)
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)
    cell = write_cell(tmp_path / "cells" / "UID_5_1_1_all.png", size=80)
    client = TestClient(create_app(ens, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu")))
    assert client.get("/api/model").status_code == 200 and client.get("/api/health").status_code == 200
    answer = client.post("/api/predict?cam=true", files=[("files", (cell.name, cell.read_bytes(), "image/png"))])
    assert answer.status_code == 200 and answer.json()["cells"][0]["cam_png"]
    assert len(reads) == 1, reads
    reads.clear()
    r = runner.invoke(app, ["predict", str(ens), str(cell), "-o", str(tmp_path / "p.csv"), "--device", "cpu",
                            "--cam", str(tmp_path / "cams"), "--no-domain-check"])  # Grad-CAM of the cells called
    # ALL (this drawn disc is outside the domain: checked, it would be called OUTSIDE): torch members too
    assert r.exit_code == 0, r.output
    assert "Grad-CAM overlays of 1 flagged cell" in r.output and len(reads) == 1, reads


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # raised inside torch.export
@pytest.mark.parametrize("name", ["vgg16", "xception", "mobilenet", "inception_resnet_v2", "densenet121",
                                  "efficientnet_b0", "convnext_tiny", "efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_every_member_exports_to_onnx_and_scores_as_in_torch(name, tmp_path):
    import torch

    from alldetect.data.geometry import Preprocess
    from alldetect.ensemble.combiners import SAP
    from alldetect.export.graph import export_onnx
    from alldetect.inference.onnx_engine import onnx_session
    from alldetect.models import create_member, list_members

    assert name in list_members()
    model = TorchEngine([create_member(name).eval()], SAP([1.0]), "sap", Preprocess(80), None, torch.device("cpu"),
                        "fp32")
    crops = np.random.default_rng(0).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    graph_prob, graph_members = onnx_session(export_onnx(model, tmp_path / f"{name}.onnx")).run(None, {"images": crops})
    ensemble, members = model.predict(crops, tta=False)
    np.testing.assert_allclose(graph_members.T, members, atol=1e-4)
    np.testing.assert_allclose(graph_prob, ensemble, atol=1e-4)


def _answers(ens, cells, out):
    """predict with the torch and the ONNX engine, Grad-CAM maps, and the web app's answer."""
    csv = {}
    for engine in ("torch", "onnx"):
        model = load_engine(ens, device="cpu", engine=engine, precision="fp32")
        predict_rows(model, collect_inputs([cells]), out / f"{engine}.csv")
        csv[engine] = (out / f"{engine}.csv").read_text()
    model = TorchEngine.from_folder(ens, device="cpu", precision="fp32")
    crops, _ = load_crops_for(model, collect_inputs([cells]).rows, {})
    cams = ensemble_cam(member_cams(model, crops, [1] * len(crops)), model.cam_weights)
    client = TestClient(create_app(ens, ServeSettings(db_path=str(out / "db.sqlite"), device="cpu")))
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(cells.iterdir())]
    served = client.post("/api/predict", files=files).json()
    return csv, cams, [(c["name"], c["prob_all"]) for c in served["cells"]]


def test_a_moved_folder_without_its_runs_gives_identical_answers(exported, member_runs, tmp_path):
    """The exported folder copied into a lab and moved again, the runs it was built from out of reach: predict
    (torch and ONNX), Grad-CAM and the web app answer byte for byte alike."""
    ens = shutil.copytree(exported, tmp_path / "lab" / "ensemble")
    cells = tmp_path / "cells"
    for i in range(3):
        write_cell(cells / f"UID_5_1_{i + 1}_all.png", size=80, value=60 + 40 * i)
    (tmp_path / "before").mkdir()
    before = _answers(ens, cells, tmp_path / "before")

    spec = json.loads((ens / "ensemble.json").read_text())
    assert all(not w.startswith("/") and w.endswith(".safetensors") for m in spec["members"] for w in m["weights"])
    moved = tmp_path / "elsewhere" / "copied-ensemble"
    shutil.move(ens, moved)
    hidden = [run.rename(run.with_name(run.name + ".hidden")) for run in member_runs]
    try:
        (tmp_path / "after").mkdir()
        after = _answers(moved, cells, tmp_path / "after")
    finally:
        for run, away in zip(member_runs, hidden):
            away.rename(run)
    assert after[0] == before[0]  # predictions CSVs, torch and ONNX, byte for byte
    np.testing.assert_array_equal(after[1], before[1])  # Grad-CAM
    assert after[2] == before[2]  # the web app
    assert (moved / "members" / "mobilenet" / "history.csv").is_file()  # the training record travels too


def test_a_colour_normalised_ensemble_answers_alike_in_torch_onnx_and_the_web(ensemble_dir, tmp_path):
    """The colour choice travels in the spec and is done inside each member: predict with either engine and the
    web page give the same probabilities, and they are not the ImageNet-normalised ones."""
    from alldetect.formats.predictions import read_predictions
    from alldetect.export.graph import graph_metadata

    ens = shutil.copytree(ensemble_dir, tmp_path / "ens")
    spec = json.loads((ens / "ensemble.json").read_text())
    for entry in spec["members"]:
        entry["colour"] = "standardise"
    spec["preprocess"]["colour"] = "standardise"
    (ens / "ensemble.json").write_text(json.dumps(spec))
    r = runner.invoke(app, ["export", str(ens), "--no-int8"])
    assert r.exit_code == 0, r.output
    assert json.loads(graph_metadata(ens / "ensemble.onnx")["preprocess"])["colour"] == "standardise"
    cells = tmp_path / "cells"
    for i in range(3):
        write_cell(cells / f"UID_5_1_{i + 1}_all.png", size=80, value=60 + 40 * i)
    (tmp_path / "standardise").mkdir()
    _, _, served = _answers(ens, cells, tmp_path / "standardise")
    predict_rows(load_engine(ensemble_dir, device="cpu", engine="torch", precision="fp32"),
                 collect_inputs([cells]), tmp_path / "imagenet.csv")
    prob = {engine: read_predictions(tmp_path / "standardise" / f"{engine}.csv")["wen_kappa"].prob_all
            for engine in ("torch", "onnx")}
    np.testing.assert_allclose(prob["onnx"], prob["torch"], atol=1e-4)
    np.testing.assert_allclose([p for _, p in served], prob["torch"], atol=1e-4)
    imagenet = read_predictions(tmp_path / "imagenet.csv")["wen_kappa"].prob_all
    assert np.abs(imagenet - prob["torch"]).max() > 1e-3
