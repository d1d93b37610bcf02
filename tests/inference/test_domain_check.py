"""The domain check through the product: the ensemble folder carries the reference (hashed), `predict` and the
web app flag cells unlike the training cells beside their probability, a patient with most cells flagged gets
no call, and frames of another geometry have a documented path."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.data.images import read_rgb
from alldetect.data.out_of_domain import smear_background
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.serve import ServeSettings, create_app

runner = CliRunner()


def _rows(path) -> list[dict]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


@pytest.fixture(scope="module")
def cells(tiny_synth, tmp_path_factory):
    """Two patients of synthetic test cells like the training cells, and a third made of the same cells on a
    smear (unsegmented): out of domain."""
    root = tmp_path_factory.mktemp("cells")
    sources = sorted(tiny_synth.rglob("*.bmp"))[:6]
    rng = np.random.default_rng(0)
    for i, path in enumerate(sources):
        rgb = read_rgb(path)[0]
        Image.fromarray(rgb).save(root / f"UID_{1 + i % 2}_1_{i + 1}_all.png")
        Image.fromarray(smear_background(rgb, rng)).save(root / f"UID_9_1_{i + 1}_all.png")
    return root


def test_the_folder_carries_the_reference_and_a_replaced_one_is_refused(ensemble_dir, cells, tmp_path):
    spec = EnsembleFolder(ensemble_dir).spec
    assert spec.domain and (ensemble_dir / EnsembleFolder.DOMAIN).is_file()
    copy = tmp_path / "ens"
    shutil.copytree(ensemble_dir, copy)
    raw = json.loads((copy / EnsembleFolder.DOMAIN).read_text())
    raw["colour_limit"] = 1e9  # a reference that would let everything through
    (copy / EnsembleFolder.DOMAIN).write_text(json.dumps(raw))
    r = runner.invoke(app, ["predict", str(copy), str(cells), "-o", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert r.exit_code == 1 and "domain.json: does not match the hash" in r.output and "Traceback" not in r.output


def test_predict_flags_unsegmented_cells_beside_their_probability(ensemble_dir, cells, tmp_path):
    out = tmp_path / "p.csv"
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(cells), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in _rows(out)}
    smeared = [row for name, row in rows.items() if name.startswith("UID_9_")]
    plain = [row for name, row in rows.items() if not name.startswith("UID_9_")]
    assert all(row["in_domain"] == "no" and "background is not black" in row["domain_note"] and row["prob_all"]
               for row in smeared)
    assert sum(row["in_domain"] == "yes" and row["domain_note"] == "" for row in plain) >= len(plain) - 1
    patients = {p["subject"]: p for p in _rows(tmp_path / "p.patients.csv")}
    assert patients["9"]["call"] == "" and patients["9"]["out_of_domain"] == "6"
    assert patients["1"]["call"] in ("all", "hem")
    assert "6 of 12 cells are unlike the cells this ensemble was trained on" in r.output

    r = runner.invoke(app, ["predict", str(ensemble_dir), str(cells), "-o", str(out), "--device", "cpu",
                            "--no-domain-check"])
    assert r.exit_code == 0 and "in_domain" not in _rows(out)[0]


def test_the_web_app_shows_outside_instead_of_a_call(ensemble_dir, cells, tmp_path):
    client = TestClient(create_app(ensemble_dir, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu")))
    files = [("files", (p.name, p.read_bytes())) for p in sorted(cells.glob("UID_9_*"))[:2]]
    files += [("files", (p.name, p.read_bytes())) for p in sorted(cells.glob("UID_1_*"))[:1]]
    body = client.post("/api/predict", files=files).json()
    smeared = [c for c in body["cells"] if c["name"].startswith("UID_9_")]
    assert all(c["call"] == "OUTSIDE" and c["in_domain"] is False and "background" in c["domain_note"]
               and c["prob_all"] is not None for c in smeared)
    patients = {p["subject"]: p for p in body["patients"]}
    assert patients["9"]["call"] == "" and patients["9"]["out_of_domain"] == 2
    rows = list(csv.DictReader(io.StringIO(client.get(body["csv_url"]).text)))
    assert {r["in_domain"] for r in rows if "UID_9_" in r["path"]} == {"no"}
    assert client.get("/api/model").json()["domain_check"]["fitted_on"].endswith("donors")


def test_frames_of_another_size_are_rescaled_on_request_and_it_is_recorded(ensemble_dir, cells, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for path in sorted(cells.glob("UID_1_*"))[:2]:
        Image.open(path).resize((40, 40)).save(small / path.name)  # below the 64 px crop
    out = tmp_path / "p.csv"
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(small), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 1 and "smaller than the 64x64 center crop" in _rows(out)[0]["error"]
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(small), "-o", str(out), "--device", "cpu",
                            "--frame-size", "80"])
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert all(row["prob_all"] and row["geometry"] == "shorter side rescaled to 80, then the 64x64 center crop"
               for row in rows)
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(small), "-o", str(out), "--device", "cpu", "--no-crop"])
    assert r.exit_code == 0 and _rows(out)[0]["geometry"] == "whole image resized to the 64x64 crop"
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(small), "-o", str(out), "--frame-size", "80",
                            "--no-crop"])
    assert r.exit_code != 0 and "exclude each other" in r.output


def test_evaluate_gives_figures_on_cells_inside_the_domain_with_their_coverage(tmp_path):
    preds = tmp_path / "p.csv"
    preds.write_text("path,label,prob_all,in_domain\na.png,all,0.9,yes\nb.png,hem,0.2,yes\nc.png,all,0.1,no\n"
                     "d.png,hem,0.3,yes\n")
    r = runner.invoke(app, ["evaluate", str(preds), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["coverage"] == 0.75 and result["tp"] + result["fp"] + result["tn"] + result["fn"] == 3
    assert result["sensitivity"] == 1.0  # the flagged ALL cell scored 0.1 is not counted as a miss


def test_the_report_gives_the_check_on_its_cells_with_the_coverage(ensemble_dir, tmp_path):
    from alldetect.report.build import make_report

    copy = tmp_path / "ens"
    shutil.copytree(ensemble_dir, copy)
    report = make_report(copy, n_boot=20).read_text()
    section = report.split("## Domain check", 1)[1]
    assert "cells when each donor is checked against a reference fitted without it" in section
    assert "| in domain" in section and "| coverage" in section
