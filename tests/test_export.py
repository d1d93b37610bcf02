import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.ensemble_model import load_ensemble
from alldetect.errors import AlldetectError
from alldetect.export import OnnxEnsemble, load_engine, load_onnx_ensemble

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(ensemble_dir, tmp_path_factory):
    ens = tmp_path_factory.mktemp("exported") / "ens"
    shutil.copytree(ensemble_dir, ens)
    r = runner.invoke(app, ["export", str(ens)])
    assert r.exit_code == 0, r.output
    return ens


@pytest.mark.filterwarnings("ignore")
def test_onnx_matches_pytorch_within_1e_4(exported):
    torch_model = load_ensemble(exported, device="cpu", precision="fp32")
    onnx_model = load_onnx_ensemble(exported)
    crops = np.random.default_rng(0).integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)  # odd batch: dynamic
    for tta in (False, True):
        (e_t, m_t), (e_o, m_o) = torch_model.predict(crops, tta=tta), onnx_model.predict(crops, tta=tta)
        np.testing.assert_allclose(e_o, e_t, atol=1e-4)
        np.testing.assert_allclose(m_o, m_t, atol=1e-4)
    graph_prob, graph_members = onnx_model.session.run(None, {"images": crops})  # the graph's own combiner
    np.testing.assert_allclose(graph_prob, torch_model.predict(crops)[0], atol=1e-4)
    np.testing.assert_allclose(graph_members.T, torch_model.member_probs(crops), atol=1e-4)
    for method in ("sap", "ts_sap", "stacking"):  # the combiners inside the graph, through the python side
        a = load_ensemble(exported, method=method, device="cpu", precision="fp32").predict(crops)[0]
        b = load_onnx_ensemble(exported, method=method).predict(crops)[0]
        np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_auto_engine_picks_the_fastest_accurate_one(exported, ensemble_dir):
    from alldetect.inference import cpu_has_native_bf16

    assert isinstance(load_engine(exported, device="cpu", precision="fp32"), OnnxEnsemble)
    assert isinstance(load_engine(exported, device="cpu"), OnnxEnsemble) != cpu_has_native_bf16()
    assert not isinstance(load_engine(ensemble_dir, device="cpu"), OnnxEnsemble)
    with pytest.raises(AlldetectError, match="alldetect export"):
        load_engine(ensemble_dir, engine="onnx")


@pytest.mark.filterwarnings("ignore")
def test_predict_with_both_engines_agrees(exported, tmp_path):
    from conftest import write_cell

    for i in range(3):
        write_cell(tmp_path / "cells" / f"UID_5_1_{i + 1}_all.png", size=80)
    for engine in ("onnx", "torch"):
        r = runner.invoke(app, ["predict", str(exported), str(tmp_path / "cells"), "--engine", engine, "-o",
                                str(tmp_path / f"{engine}.csv"), "--device", "cpu", "--precision", "fp32"])
        assert r.exit_code == 0, r.output
    from alldetect.predictions import read_predictions

    a = read_predictions(tmp_path / "onnx.csv")["wen_kappa"].prob_all
    b = read_predictions(tmp_path / "torch.csv")["wen_kappa"].prob_all
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_the_web_app_serves_the_onnx_graph_when_exported(exported, ensemble_dir, tmp_path):
    from fastapi.testclient import TestClient

    from alldetect.serve import ServeSettings, create_app

    def engine_of(ens):
        app = create_app(ens, ServeSettings(db_path=str(tmp_path / "p.sqlite"), device="cpu"))
        return TestClient(app).get("/api/model").json()["engine"]

    assert engine_of(exported) == "OnnxEnsemble"
    assert engine_of(ensemble_dir) == "EnsembleModel"
