"""The GPU check script never rots: its --smoke mode runs every section's code on a CPU."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for section in ("env", "train", "paper", "infer"):
        assert f"{section}: ok" in done.stdout
    assert done.stdout.strip().endswith("gpu_check: ok")
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "SMOKE" in report and "Projected five members x 12 epochs" in report
    assert (tmp_path / "out" / "gpu_check.json").is_file()
