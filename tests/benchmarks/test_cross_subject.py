"""The cross-subject yardstick (benchmarks/cross_subject.py) in its --quick mode, and the folds beneath it."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from alldetect.data.index import index_folder
from alldetect.data.split import subject_folds
from alldetect.errors import DataError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cross_subject.py"


def test_subject_folds_hold_out_every_subject_once_with_both_classes(tiny_synth):
    rows = [r for r in index_folder(tiny_synth).rows if r.label]
    folds = subject_folds(rows, 3, seed=1)
    assert set(folds) == {r.subject for r in rows}
    for fold in range(3):
        held = {r.label for r in rows if folds[r.subject] == fold}
        assert held == {"all", "hem"}
    assert max(Counter(folds.values()).values()) - min(Counter(folds.values()).values()) <= 1
    with pytest.raises(DataError, match="6 subject folds need at least 6 subjects of each class"):
        subject_folds(rows, 6)


def test_quick_yardstick_scores_every_subject_out_of_fold(tiny_synth, tmp_path):
    out = tmp_path / "cs"
    command = [sys.executable, str(SCRIPT), "--quick", "--data", str(tiny_synth), "--crop", "32", "--folds", "2",
               "--members", "mobilenet,efficientnet_lite0", "--no-pretrained", "--recipe", "paper",
               "--recipe", "plus-e2=plus:epochs=2", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "cross_subject.json").read_text())
    rows = [r for r in index_folder(tiny_synth).rows if r.label]
    assert result["subjects"] == len({r.subject for r in rows})
    table = {(r["recipe"], r["model"], r["tta"]): r for r in result["table"]}
    for recipe in ("paper", "plus-e2"):
        for model in ("mobilenet", "efficientnet_lite0", "sap", "wen_kappa", "stacking"):
            for tta in ("no", "yes"):
                row = table[(recipe, model, tta)]
                assert 0 <= row["auc"] <= 1 and row["subjects_right"].endswith(f"/{result['subjects']}")
    pooled = result["predictions"]["paper|sap|plain"]
    assert sorted(pooled["subject"]) == sorted(r.subject for r in rows)  # every cell held out exactly once
    assert "wen_kappa" in done.stdout and "wall time" in done.stdout
    config = json.loads((out / "fold0" / "plus-e2" / "mobilenet" / "config.json").read_text())["config"]
    assert config["epochs"] == 2  # the recipe's own value wins over --quick's
