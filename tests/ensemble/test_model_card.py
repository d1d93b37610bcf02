"""MODEL_CARD.md: written with the ensemble, its numbers those of the report, linked from the web page."""

import json
import re
import shutil

from fastapi.testclient import TestClient

from alldetect.ensemble.card import SECTIONS
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.report.build import make_report
from alldetect.serve import ServeSettings, create_app


def test_card_has_the_hub_sections_and_the_report_numbers(ensemble_dir, tmp_path):
    ens = tmp_path / "ens"
    shutil.copytree(ensemble_dir, ens)
    card = (ens / EnsembleFolder.CARD).read_text()  # written by build_ensemble
    assert [line[3:] for line in card.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert "SYNTHETIC" in card and "must not be used to diagnose" in card
    assert "No report yet" in card

    make_report(ens, n_boot=50)
    card = (ens / EnsembleFolder.CARD).read_text()
    results = json.loads((ens / "table4.json").read_text())
    method = json.loads((ens / "ensemble.json").read_text())["default_method"]
    test, ci = results["metrics"][method], results["ci95"][method]
    row = next(line for line in card.splitlines() if line.startswith(f"| {results['split']} (95% CI) |"))
    assert f"{test['auc']:.3f} ({ci['auc'][0]:.3f}-{ci['auc'][1]:.3f})" in row
    assert f"{test['ba']:.3f} ({ci['ba'][0]:.3f}-{ci['ba'][1]:.3f})" in row
    val_row = next(line for line in card.splitlines() if line.startswith("| validation |"))
    assert f"{results['val_metrics'][method]['auc']:.3f}" in val_row
    counts = results["data"]["counts"]["train"]["all"]
    assert re.search(rf"\| train \| {counts['images']} \| {counts['subjects']} \|", card)
    assert (ens / "training.png").stat().st_size > 10_000
    assert "![training curves](training.png)" in (ens / "report.md").read_text()

    client = TestClient(create_app(ens, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu")))
    assert 'href="/model-card"' in client.get("/").text
    assert client.get("/model-card").text == card


def test_the_card_names_the_batches_it_was_trained_on_and_claims_no_figure_it_did_not_measure(ensemble_dir):
    card = (ensemble_dir / EnsembleFolder.CARD).read_text()
    spec = json.loads((ensemble_dir / "ensemble.json").read_text())
    batches = spec["data"]["batches"]
    assert batches and f"trained on cells of {len(batches)} batch" in card and ", ".join(batches) in card
    assert "was not measured for this model" in card and "lost about 0.2" not in card
    recorded = spec["versions"]
    assert {"torchvision", "pillow", "scikit-learn", "onnxruntime", "commit"} <= set(recorded)


def test_the_card_says_how_the_members_set_a_cell_s_colour(ensemble_dir, tmp_path):
    from alldetect.ensemble.card import write_model_card

    ens = shutil.copytree(ensemble_dir, tmp_path / "ens")
    assert "mean/std its ImageNet weights expect" in (ens / EnsembleFolder.CARD).read_text()
    spec = json.loads((ens / "ensemble.json").read_text())
    for entry in spec["members"]:
        entry["colour"] = "centre"
    spec["preprocess"]["colour"] = "centre"
    (ens / "ensemble.json").write_text(json.dumps(spec))
    write_model_card(EnsembleFolder(ens))
    card = (ens / EnsembleFolder.CARD).read_text()
    assert "Colour `centre`" in card and "mean/std its ImageNet weights expect" not in card
    assert "stained pixels (brighter than 8/255 in some channel) is subtracted" in card
