"""The operating point: fitted thresholds for cells and patients, and how many cells a patient call needs."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from alldetect.evaluation.evaluate import donor_bootstrap_ci, donor_metrics, subject_level
from alldetect.evaluation.metrics import classification_metrics
from alldetect.evaluation.operating_point import (balanced_accuracy_threshold, fit_operating_point,
                                                  patient_threshold, threshold_for_specificity)
from alldetect.formats.operating_point import PAPER_POINT, OperatingPoint


def _donors(seed=0, shift=0.25):
    """Six ALL and four healthy donors whose cells all score high: 0.5 calls every healthy donor ALL."""
    rng = np.random.default_rng(seed)
    y, prob, subjects = [], [], []
    for d in range(10):
        label = int(d < 6)
        n = int(rng.integers(5, 40))
        centre = 0.8 if label else 0.8 - shift
        y += [label] * n
        prob += np.clip(rng.normal(centre, 0.1, n), 0.01, 0.99).tolist()
        subjects += [f"{'' if label else 'H'}{d}"] * n
    return np.array(y), np.array(prob), subjects


def test_balanced_accuracy_threshold_is_the_best_one_and_sits_between_scores():
    y, prob, _ = _donors()
    t = balanced_accuracy_threshold(y, prob)
    best = max(balanced_accuracy_score(y, prob >= c) for c in np.unique(prob))
    assert balanced_accuracy_score(y, prob >= t) == pytest.approx(best)
    assert t not in set(prob.tolist())
    assert balanced_accuracy_score(y, prob >= 0.5) < best  # the paper's 0.5 calls the shifted healthy cells ALL


def test_specificity_threshold_is_the_lowest_that_keeps_the_target():
    y, prob, _ = _donors(1)
    for target in (0.5, 0.8, 0.95, 1.0):
        t = threshold_for_specificity(y, prob, target)
        assert classification_metrics(y, prob, threshold=t)["specificity"] >= target
        lower = np.sort(prob[y == 0])
        below = lower[lower < t]
        if len(below):  # one negative fewer below the threshold would miss the target
            assert classification_metrics(y, prob, threshold=below[-1])["specificity"] < target


def test_patient_threshold_separates_donor_means_with_the_widest_margin():
    assert patient_threshold(np.array([0.2, 0.3, 0.6, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.45)
    t = patient_threshold(np.array([0.55, 0.6, 0.58, 0.9, 0.95]), np.array([0, 0, 1, 1, 1]))
    assert 0.6 < t < 0.9


def test_fitted_point_calls_donors_right_that_the_paper_point_calls_wrong():
    y, prob, subjects = _donors(2)
    point = fit_operating_point(y, prob, subjects, fitted_on="test donors")
    assert point.criterion == "balanced_accuracy" and point.fitted_on == "test donors"
    assert donor_metrics(y, prob, subjects, point=point)["subjects_right"] == 1.0
    assert donor_metrics(y, prob, subjects, point=PAPER_POINT)["hem_right"] == 0.0
    table = subject_level(y, prob, subjects, point=point)
    assert all(r["correct"] == "yes" for r in table)
    assert 1 <= point.min_cells <= 50


def test_min_cells_grows_when_single_cells_are_noisy():
    rng = np.random.default_rng(3)
    y, prob, subjects = [], [], []
    for d in range(12):
        label = int(d < 6)
        y += [label] * 60
        prob += np.clip(rng.normal(0.6 if label else 0.4, 0.3, 60), 0, 1).tolist()  # cells overlap, means do not
        subjects += [str(d)] * 60
    point = fit_operating_point(np.array(y), np.array(prob), subjects)
    assert point.min_cells > 1
    clean = fit_operating_point(*_donors(4, shift=0.6))
    assert clean.min_cells == 1


def test_sensitivity_and_specificity_criteria_record_their_target():
    y, prob, subjects = _donors(5)
    sens = fit_operating_point(y, prob, subjects, criterion="sensitivity", target=0.95)
    spec = fit_operating_point(y, prob, subjects, criterion="specificity", target=0.9)
    assert classification_metrics(y, prob, threshold=sens.cell_threshold)["sensitivity"] >= 0.95
    assert classification_metrics(y, prob, threshold=spec.cell_threshold)["specificity"] >= 0.9
    assert (sens.target, spec.target) == (0.95, 0.9) and "sensitivity >= 0.95" in sens.describe()


def test_point_round_trips_and_refuses_bad_fields():
    point = OperatingPoint(0.3, 0.4, 3, "balanced_accuracy", None, "out-of-fold predictions")
    assert OperatingPoint.from_json(point.to_json()) == point
    for bad in ({"cell_threshold": 1.5}, {"min_cells": 0}, {"criterion": "vibes"}, {"colour": "red"}):
        with pytest.raises(ValueError):
            OperatingPoint.from_json({**PAPER_POINT.to_json(), **bad})


def test_donor_bootstrap_interval_holds_the_point_estimate():
    y, prob, subjects = _donors(6)
    point = fit_operating_point(y, prob, subjects)
    m = donor_metrics(y, prob, subjects, point=point)
    ci = donor_bootstrap_ci(y, prob, subjects, point=point, n_boot=200)
    for key in ("auc", "ba", "specificity", "subject_auc"):
        assert ci[key][0] <= m[key] <= ci[key][1]
