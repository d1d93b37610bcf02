"""The report of an ensemble folder."""

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.formats.predictions import read_predictions
from alldetect.report.build import make_report

runner = CliRunner()


def test_ensemble_and_report_end_to_end(member_runs, tmp_path):
    r = runner.invoke(app, ["ensemble", *map(str, member_runs), "--out", str(tmp_path / "ens")])
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert [m["name"] for m in spec["members"]] == ["mobilenet", "efficientnet_lite0"]
    assert spec["default_method"] == "wen_kappa" and spec["data"]["synthetic"]
    test = read_predictions(tmp_path / "ens" / "predictions_test.csv")
    assert set(test) == {"mobilenet", "efficientnet_lite0", "sap", "wen_acc", "wen_auc", "wen_f1", "wen_kappa",
                         "logloss", "ts_sap", "stacking"}
    members = np.stack([test["mobilenet"].prob_all, test["efficientnet_lite0"].prob_all])
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
