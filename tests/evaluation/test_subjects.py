"""Subject-level calls, bootstrap intervals and the evaluate command."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.evaluation.evaluate import bootstrap_ci, paired_bootstrap, subject_level
from alldetect.evaluation.metrics import classification_metrics
from alldetect.formats.predictions import read_predictions

runner = CliRunner()


def test_subject_level_rule_and_bootstrap():
    y = np.array([1, 1, 1, 0, 0, 0])
    prob = np.array([0.9, 0.4, 0.6, 0.2, 0.7, 0.3])
    subjects = ["1", "1", "1", "H1", "H1", "H1"]
    table = subject_level(y, prob, subjects)
    assert [(r["subject"], r["flagged_all"], r["call"], r["correct"]) for r in table] == \
        [("1", 2, "all", "yes"), ("H1", 1, "hem", "yes")]
    assert table[0]["mean_prob_all"] == pytest.approx(1.9 / 3)
    rng = np.random.default_rng(1)
    y = np.repeat([1, 0] * 10, 5)
    groups = np.repeat(np.arange(20), 5)
    p = np.clip(0.5 + 0.15 * (2 * y - 1) + rng.normal(0, 0.25, len(y)), 0, 1)
    ci = bootstrap_ci(y, p, groups, n_boot=300)
    point = classification_metrics(y, p)
    for k in ("ba", "auc", "wfs"):
        assert ci[k][0] <= point[k] <= ci[k][1]
    same = paired_bootstrap(y, p, p, groups, n_boot=100)
    assert same["difference"] == 0 and same["ci"] == (0.0, 0.0)
    better = paired_bootstrap(y, np.where(y == 1, 0.9, 0.1), p, groups, n_boot=200)
    assert better["ci"][0] > 0 and better["p_not_better"] == 0


def test_evaluate_cli_json_and_per_model(member_runs, ensemble_dir):
    keys = {"wp", "wr", "wfs", "acc", "ba", "auc", "kappa", "sensitivity", "specificity", "tn", "fp", "fn", "tp"}
    one = member_runs[0] / "predictions_test.csv"
    r = runner.invoke(app, ["evaluate", str(one), "--json"])
    assert r.exit_code == 0, r.output
    (p,) = read_predictions(one).values()
    result = json.loads(r.output)
    assert result.pop("threshold") == 0.5  # the paper's, for predictions of no ensemble
    assert result == pytest.approx(classification_metrics(p.y, p.prob_all))
    several = ensemble_dir / "predictions_test.csv"  # every member and every method
    r = runner.invoke(app, ["evaluate", str(several), "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.output)
    models = read_predictions(several)
    assert set(results) == set(models) and len(models) > 2
    for name, p in models.items():
        assert set(results[name]) >= keys, name
        assert {k: results[name][k] for k in keys} == pytest.approx(classification_metrics(p.y, p.prob_all)), name


def test_one_class_only_says_auc_is_undefined(tmp_path):
    (tmp_path / "p.csv").write_text("path,label,prob_all\na.png,all,0.9\nb.png,all,0.2\n")
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv"), "--json"])
    assert r.exit_code == 0
    assert "AUC is undefined" in r.output
