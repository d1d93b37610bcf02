"""Combiners (Eqs. 1-2 and the fitted ones) on numbers worked by hand."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alldetect.ensemble.combiners import EnsembleFit, fit_combiner, sap, weighted_average, wen_weights
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
    assert EnsembleFit(**json.loads(json.dumps(ts.__dict__))).apply(probs) == pytest.approx(ts.apply(probs))


def test_wen_falls_back_to_equal_weights_when_no_member_beats_chance():
    y = np.array([1, 1, 0, 0])
    probs = np.array([[0.1, 0.2, 0.8, 0.9], [0.4, 0.3, 0.6, 0.7]])
    assert wen_weights(y, probs, "kappa").tolist() == [1.0, 1.0]
