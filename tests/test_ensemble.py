import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.ensemble.combiners import EnsembleFit, fit_combiner, sap, weighted_average, wen_weights
from alldetect.ensemble.build import build_ensemble
from alldetect.errors import DataError
from alldetect.evaluation.evaluate import bootstrap_ci, paired_bootstrap, subject_level
from alldetect.evaluation.metrics import classification_metrics
from alldetect.formats.predictions import read_predictions, write_predictions
from alldetect.report.build import make_report

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
    f1 = wen_weights(y, probs, "f1")
    assert f1.tolist() == pytest.approx([classification_metrics(y, p)["wfs"] for p in probs])
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


def test_ensemble_and_report_end_to_end(member_runs, tmp_path):
    r = runner.invoke(app, ["ensemble", *map(str, member_runs), "--out", str(tmp_path / "ens")])
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert [m["name"] for m in spec["members"]] == ["mobilenet", "densenet121"]
    assert spec["default_method"] == "wen_kappa" and spec["data"]["synthetic"]
    test = read_predictions(tmp_path / "ens" / "predictions_test.csv")
    assert set(test) == {"mobilenet", "densenet121", "sap", "wen_acc", "wen_auc", "wen_f1", "wen_kappa",
                         "logloss", "ts_sap", "stacking"}
    members = np.stack([test["mobilenet"].prob_all, test["densenet121"].prob_all])
    np.testing.assert_allclose(test["sap"].prob_all, members.mean(0), atol=1e-7)
    w = np.array(spec["methods"]["wen_kappa"]["weights"])
    np.testing.assert_allclose(test["wen_kappa"].prob_all, (w @ members) / w.sum(), atol=1e-7)

    r = runner.invoke(app, ["report", str(tmp_path / "ens"), "--bootstrap", "100"])
    assert r.exit_code == 0, r.output
    report = (tmp_path / "ens" / "report.md").read_text()
    assert report.startswith("**Data: SYNTHETIC")
    assert "paper protocol (Table 3)" in report.splitlines()[0]
    for name in ("roc.png", "confusion.png", "calibration.png", "table4.csv", "table4.json", "subjects.csv"):
        assert (tmp_path / "ens" / name).stat().st_size > 0, name
    for row in ("| mobilenet |", "| SAP |", "| WEN-kappa |", "| logistic stacking |"):
        assert row in report


def test_evaluate_cli_json_and_per_model(member_runs):
    r = runner.invoke(app, ["evaluate", str(member_runs[0] / "predictions_test.csv"), "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)) >= {"wp", "wr", "wfs", "acc", "ba", "auc", "kappa", "tn", "fp", "fn", "tp"}


def test_members_covering_different_images_are_refused(member_runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(member_runs[1], other)
    preds = read_predictions(other / "predictions_val.csv")["densenet121"]
    write_predictions(other / "predictions_val.csv", preds.path[1:], ["all" if y else "hem" for y in preds.y[1:]],
                      preds.prob_all[1:], model="densenet121")
    with pytest.raises(DataError, match="cover different images: 1 only in"):
        build_ensemble([member_runs[0], other], tmp_path / "ens")
    labels = ["hem" if y else "all" for y in preds.y]  # every label flipped
    write_predictions(other / "predictions_val.csv", preds.path, labels, preds.prob_all, model="densenet121")
    with pytest.raises(DataError, match="disagree on the label"):
        build_ensemble([member_runs[0], other], tmp_path / "ens")


@pytest.mark.parametrize("content, message", [
    ("path,prob_all\na.png,0.5\n", "missing column"),
    ("path,label,prob_all\na.png,all,1.5\n", "not a probability"),
    ("path,label,prob_all\na.png,all,nan\n", "not a probability"),
    ("path,label,prob_all\na.png,all,x\n", "not a number"),
    ("path,label,prob_all\na.png,blast,0.5\n", "label 'blast'"),
])
def test_bad_prediction_files_are_clear_errors(tmp_path, content, message):
    (tmp_path / "p.csv").write_text(content)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_one_class_only_says_auc_is_undefined(tmp_path):
    (tmp_path / "p.csv").write_text("path,label,prob_all\na.png,all,0.9\nb.png,all,0.2\n")
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv"), "--json"])
    assert r.exit_code == 0
    assert "AUC is undefined" in r.output


def test_wen_falls_back_to_equal_weights_when_no_member_beats_chance():
    y = np.array([1, 1, 0, 0])
    probs = np.array([[0.1, 0.2, 0.8, 0.9], [0.4, 0.3, 0.6, 0.7]])
    assert wen_weights(y, probs, "kappa").tolist() == [1.0, 1.0]


def test_report_without_subjects_says_so(ensemble_dir, tmp_path):
    import csv

    ens = tmp_path / "ens"
    shutil.copytree(ensemble_dir, ens)
    (ens / "subjects.csv").unlink(missing_ok=True)
    for split in ("val", "test"):
        path = ens / f"predictions_{split}.csv"
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames, [{**r, "subject": ""} for r in reader]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    text = make_report(ens, n_boot=50).read_text()
    assert "No subjects could be parsed" in text and not (ens / "subjects.csv").exists()


def test_bf16_check_keeps_a_member_that_bf16_moves_in_fp32(ensemble_dir, tmp_path):
    from alldetect.ensemble.folder import read_calibration
    from alldetect.ensemble.build import check_bf16
    from alldetect.inference.torch_engine import load_ensemble

    ens = tmp_path / "ens"
    shutil.copytree(ensemble_dir, ens)
    verdict = check_bf16(ens, tolerance=1.0)
    assert verdict["fp32_members"] == [] and set(verdict["mean_change"]) == {"mobilenet", "densenet121"}
    assert all(0 < d < 1.0 for d in verdict["mean_change"].values())
    verdict = check_bf16(ens, tolerance=0.0)
    assert verdict["fp32_members"] == ["mobilenet", "densenet121"]
    model = load_ensemble(ens, device="cpu", precision="bf16")
    assert model.fp32_members == {"mobilenet", "densenet121"}
    crops = read_calibration(ens)[0][:8]
    fp32 = load_ensemble(ens, device="cpu", precision="fp32").member_probs(crops)
    np.testing.assert_array_equal(model.member_probs(crops), fp32)  # bf16 asked, fp32 run
    model.fp32_members = frozenset()
    assert not np.array_equal(model.member_probs(crops), fp32)  # without the verdict: bf16
