"""The cross-batch yardstick (benchmarks/cross_batch.py) in its --quick mode: trained through `alldetect run`
on some real donors, scored on others, every figure with an interval over the test donors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cross_batch.py"
TEST_DONORS = ("H22", "2", "23", "30")


def _donor_folders(cells: Path, root: Path) -> tuple[Path, Path]:
    """The shipped real cells split by donor: four donors (one healthy) to test, the rest to train."""
    for path in (cells / "fold_1").rglob("*.png"):
        subject = path.name.split("_")[1]
        side = "test" if subject in TEST_DONORS else "train"
        target = root / side / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return root / "train", root / "test"


def test_quick_cross_batch_trains_through_the_product_and_scores_new_donors(real_cells, tmp_path):
    train, test = _donor_folders(real_cells, tmp_path / "data")
    out = tmp_path / "cb"
    command = [sys.executable, str(SCRIPT), "--quick", "--train", str(train), "--test", str(test),
               "--members", "mobilenet,efficientnet_lite0", "--no-pretrained", "--folds", "2", "--bootstrap", "50",
               "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "cross_batch.json").read_text())
    assert result["cross_fitted"] and result["folds"] == 2
    assert result["test_donors"] == len(TEST_DONORS)
    assert set(result["subjects"]) == set(TEST_DONORS)  # scored on the held-back donors only
    table = {(r["model"], r["point"]): r for r in result["table"]}
    for model in ("mobilenet", "efficientnet_lite0", "sap", "wen_kappa", "stacking"):
        row = table[(model, "shipped")]
        lo, hi = map(float, row["auc_ci"].split("-"))
        assert lo <= row["auc"] <= hi and row["donors"].endswith(f"/{len(TEST_DONORS)}")
    assert ("wen_kappa", "0.5") in table  # a fitted point is compared with the paper's
    assert table[("wen_kappa", "shipped")]["threshold"] == result["operating_points"]["wen_kappa"]["cell_threshold"]
    assert "wen_kappa" in done.stdout and "wall time" in done.stdout
