import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from alldetect.evaluation.metrics import (UndefinedMetricWarning, classification_metrics, metrics_from_counts,
                                          threshold_for_sensitivity)


def _from_table5(hem_right, hem_wrong, all_right, all_wrong):
    return metrics_from_counts(tn=hem_right, fp=hem_wrong, fn=all_wrong, tp=all_right)


def test_reproduces_paper_table_5_xception():
    m = _from_table5(557, 91, 1046, 173)
    assert [round(m[k], 3) for k in ("wp", "wr", "wfs", "acc", "ba")] == [0.865, 0.859, 0.860, 0.859, 0.859]
    assert round(m["sensitivity"], 4) == 0.8581 and round(m["specificity"], 4) == 0.8596  # 85.81%, 85.96%


def test_reproduces_paper_table_5_wen_kappa():
    m = _from_table5(502, 146, 1155, 64)
    assert [round(m[k], 3) for k in ("wp", "wr", "wfs", "acc")] == [0.887, 0.888, 0.886, 0.888]
    assert round(m["ba"], 4) == 0.8611  # the paper prints 0.862; exact arithmetic gives 0.8611
    assert round(m["sensitivity"], 4) == 0.9475 and round(m["specificity"], 4) == 0.7747


def _sklearn(y, p, threshold=0.5):
    yhat = (p >= threshold).astype(int)
    wp, wr, wfs, _ = skm.precision_recall_fscore_support(y, yhat, average="weighted", zero_division=0)
    tn, fp, fn, tp = skm.confusion_matrix(y, yhat, labels=[0, 1]).ravel()
    return {"wp": wp, "wr": wr, "wfs": wfs, "acc": skm.accuracy_score(y, yhat),
            "ba": skm.balanced_accuracy_score(y, yhat), "auc": skm.roc_auc_score(y, p),
            "kappa": skm.cohen_kappa_score(y, yhat),
            "sensitivity": skm.recall_score(y, yhat, zero_division=0),
            "specificity": skm.recall_score(y, yhat, pos_label=0, zero_division=0),
            "tn": tn, "fp": fp, "fn": fn, "tp": tp}


@pytest.mark.parametrize("seed", range(40))
def test_equals_scikit_learn_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = rng.random(n)
    if seed % 3 == 0:
        p = np.round(p, 1)  # ties
    if seed % 5 == 0:
        p = np.clip(p + 0.4 * (2 * y - 1), 0, 1)
    threshold = [0.5, 0.3, 0.8][seed % 3]
    ours, ref = classification_metrics(y, p, threshold=threshold), _sklearn(y, p, threshold)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(float(v), abs=1e-12, rel=1e-12), k


def test_degenerate_predictions_match_scikit_learn():
    y = np.array([0, 0, 1, 1, 1])
    for p in (np.zeros(5), np.ones(5)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _sklearn(y, p)
        ours = classification_metrics(y, p)
        for k, v in ref.items():
            assert ours[k] == pytest.approx(float(v), abs=1e-12), k


def test_one_class_only_gives_nan_auc_with_a_warning():
    with pytest.warns(UndefinedMetricWarning, match="one class"):
        m = classification_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert np.isnan(m["auc"]) and m["sensitivity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("y, p, message", [
    ([0, 1], [0.5], "2 labels but 1 scores"),
    ([0, 1], [0.5, np.nan], "NaN"),
    ([0, 1], [0.5, 1.2], r"\[0, 1\]"),
    ([0, 2], [0.5, 0.5], "labels must be 0"),
    ([], [], "no samples"),
])
def test_bad_inputs_are_clear_errors(y, p, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, p)


def test_threshold_for_sensitivity():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.3, 0.5, 0.1])
    t = threshold_for_sensitivity(y, p, 0.75)
    assert t == 0.4 and classification_metrics(y, p, threshold=t)["sensitivity"] >= 0.75
    assert threshold_for_sensitivity(y, p, 1.0) == 0.3
