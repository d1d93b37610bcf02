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
    for section in ("env", "data", "train", "paper", "infer", "options"):
        assert f"{section}: ok" in done.stdout
    assert done.stdout.strip().endswith("gpu_check: ok")
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "SMOKE" in report and "All five members x 12 epochs" in report and "shipped / bare" in report
    assert "Profile of `fit()`" in report and "`predict` end to end" in report
    assert (tmp_path / "out" / "gpu_check.json").is_file()


def test_domain_check_benchmark_prints_every_case(tmp_path):
    """benchmarks/domain_check.py on the shipped real cells: the reference from one C-NMC folder, the cases from
    the other."""
    import sys

    fixtures = ROOT / "tests" / "fixtures" / "cnmc"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "domain_check.py"), "--train",
                           str(fixtures / "fold_1"), "--test", str(fixtures / "bmp")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for case in ("real cells of new donors", "smear background", "rescaled 0.5x", "noise frame"):
        assert f"| {case} |" in done.stdout
    assert "measures and check" in done.stdout


def test_scoring_memory_benchmark_sweeps_every_request_size(ensemble_dir):
    import sys

    cells = ROOT / "tests" / "fixtures" / "cnmc" / "bmp"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scoring_memory.py"), str(ensemble_dir),
                           "--sweeps", "2", "--largest", "3", "--cells", str(cells)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| loaded |" in done.stdout and "| after sweep 2 |" in done.stdout
