"""Combiners (Eqs. 1-2 and the fitted ones) on numbers worked by hand."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alldetect.ensemble.combiners import combiner_from_json, fit_combiner, sap, weighted_average, wen_weights
from alldetect.evaluation.metrics import classification_metrics

runner = CliRunner()


def test_sap_is_equation_1_by_hand():
    probs = np.array([[0.9, 0.2, 0.5], [0.6, 0.1, 0.5], [0.3, 0.9, 0.5]])
    # P'_ALL = sum_k P_ALL,k / sum_j sum_k P_jk, and sum_j sum_k P_jk = 3 for normalised members
    assert sap(probs).tolist() == pytest.approx([0.6, 0.4, 0.5])


def test_wen_is_equation_2_by_hand():
    probs = np.array([[0.8, 0.3], [0.2, 0.9]])
    assert weighted_average(probs, np.array([0.75, 0.25])).tolist() == pytest.approx([0.65, 0.45])
    assert weighted_average(probs, np.array([3.0, 1.0])).tolist() == pytest.approx([0.65, 0.45])  # normalised


def test_wen_weights_are_validation_metrics():
    y = np.array([1, 1, 0, 0])
    probs = np.array([[0.9, 0.8, 0.2, 0.1], [0.9, 0.2, 0.3, 0.1], [0.1, 0.2, 0.8, 0.9]])
    acc = wen_weights(y, probs, "acc")
    assert acc.tolist() == [1.0, 0.75, 0.0]
    kappa = wen_weights(y, probs, "kappa")  # the third member is worse than chance: weight 0
    assert kappa.tolist() == pytest.approx([1.0, 0.5, 0.0])
    # member 2 calls [ALL, HEM, HEM, HEM]: F1 of ALL 2/3, of HEM 4/5, weighted by support (2 and 2): 11/15
    assert wen_weights(y, probs, "f1").tolist() == pytest.approx([1.0, 11 / 15, 0.0])
    fit = fit_combiner("wen_acc", y, probs)
    assert fit.apply(probs).tolist() == pytest.approx(((acc @ probs) / acc.sum()).tolist())


def test_learned_combiners_beat_sap_on_validation_when_a_member_is_bad():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.15, 400), 0.01, 0.99)
    noise = rng.random(400)
    probs = np.stack([good, noise, noise[::-1]])
    logloss = fit_combiner("logloss", y, probs)
    assert logloss.weights[0] > 0.8 and sum(logloss.weights) == pytest.approx(1)
    for method in ("logloss", "stacking", "ts_sap"):
        out = fit_combiner(method, y, probs).apply(probs)
        assert ((out >= 0) & (out <= 1)).all()
        assert classification_metrics(y, out)["auc"] > classification_metrics(y, sap(probs))["auc"]
    ts = fit_combiner("ts_sap", y, probs)
    assert combiner_from_json("ts_sap", json.loads(json.dumps(ts.to_json())), 3).apply(probs) == \
        pytest.approx(ts.apply(probs))


def test_wen_falls_back_to_equal_weights_when_no_member_beats_chance():
    y = np.array([1, 1, 0, 0])
    probs = np.array([[0.1, 0.2, 0.8, 0.9], [0.4, 0.3, 0.6, 0.7]])
    assert wen_weights(y, probs, "kappa").tolist() == [1.0, 1.0]


def test_a_new_combiner_is_one_registered_class_that_the_spec_and_the_onnx_graph_carry(ensemble_dir, tmp_path):
    """The loudest member decides: a combiner written as one class, fitted into an ensemble folder, read back from
    its spec, and run inside the graph `alldetect export --method loudest --no-int8` writes."""
    import shutil

    import torch

    from alldetect.cli import app
    from alldetect.ensemble.combiners import COMBINERS, Combiner
    from alldetect.ensemble.folder import EnsembleFolder
    from alldetect.formats.predictions import read_predictions
    from alldetect.inference.onnx_engine import OnnxEngine
    from alldetect.inference.torch_engine import TorchEngine

    class Loudest(Combiner, name="loudest", label="loudest member"):  # registered as it is defined
        @classmethod
        def fit(cls, y_val, val_probs):
            return cls()

        def apply(self, probs):
            return np.asarray(probs, dtype=np.float64).max(axis=0)

        def forward(self, probs):
            return probs.max(dim=1).values

        @classmethod
        def _checked(cls, raw, members):
            return cls()

    try:
        ens = shutil.copytree(ensemble_dir, tmp_path / "ens", ignore=shutil.ignore_patterns("calibration.npz"))
        folder = EnsembleFolder(ens)
        spec = folder.spec
        val = read_predictions(folder.predictions("val"))
        spec.methods["loudest"] = fit_combiner("loudest", val["sap"].y, np.stack([val[m].prob_all
                                                                                 for m in spec.names]))
        folder.save_spec(spec)
        model = TorchEngine.from_folder(ens, method="loudest", device="cpu", precision="fp32")  # read back
        assert isinstance(model.combiner, Loudest) and model.cam_weights.tolist() == [1.0, 1.0]
        crops = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
        ensemble, members = model.predict(crops, tta=False)
        np.testing.assert_array_equal(ensemble, members.max(axis=0))

        r = runner.invoke(app, ["export", str(ens), "--method", "loudest", "--no-int8"])  # no calibration needed
        assert r.exit_code == 0, r.output
        assert (ens / "ensemble.onnx").is_file() and not (ens / "ensemble.int8.onnx").exists()
        graph = OnnxEngine.from_folder(ens, method="loudest")
        graph_prob, graph_members = graph.session.run(None, {"images": crops})
        np.testing.assert_allclose(graph_prob, graph_members.max(axis=1), atol=1e-6)  # the combiner in the graph
        np.testing.assert_allclose(graph_prob, ensemble, atol=1e-4)
        with torch.no_grad():
            assert Loudest().forward(torch.tensor([[0.2, 0.7]])).tolist() == pytest.approx([0.7])
    finally:
        COMBINERS.pop("loudest")
