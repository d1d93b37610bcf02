"""The base install (`pip install alldetect`, no extras) predicts and evaluates with the torch engine, and each
part an extra adds says in one line which extra to install."""

import os
import subprocess
import sys

import pytest

from alldetect.errors import EXTRAS
from helpers import write_cell

BLOCKED = sorted({m for modules in EXTRAS.values() for m in modules} | {"starlette", "pandas"})


@pytest.fixture
def without_extras(tmp_path):
    """An environment whose Python cannot import any extra's packages."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _alldetect(env, *args):
    return subprocess.run([sys.executable, "-m", "alldetect.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_base_install_predicts_and_evaluates(ensemble_dir, tmp_path, without_extras):
    cell = write_cell(tmp_path / "UID_3_1_1_all.png", size=80)
    probe = subprocess.run([sys.executable, "-c", "import onnxruntime"], capture_output=True, env=without_extras)
    assert probe.returncode != 0, "the extras' packages must be out of reach here"
    done = _alldetect(without_extras, "predict", ensemble_dir, cell, "-o", tmp_path / "p.csv", "--device", "cpu",
                      "--no-domain-check")  # a drawn disc: checked, it would be outside, and evaluate leaves it out
    assert done.returncode == 0, done.stderr
    assert "call" in (tmp_path / "p.csv").read_text().splitlines()[0]
    done = _alldetect(without_extras, "evaluate", tmp_path / "p.csv")
    assert done.returncode == 0, done.stderr
    api = subprocess.run([sys.executable, "-c", f"import alldetect; print(alldetect.load({str(ensemble_dir)!r}, "
                                                f"device='cpu').predict([{str(cell)!r}])['call'])"],
                         capture_output=True, text=True, env=without_extras)
    assert api.returncode == 0 and api.stdout.strip() in ("['ALL']", "['HEM']", "['OUTSIDE']"), api.stderr


@pytest.mark.parametrize("extra, command", [("serve", ["serve"]), ("onnx", ["export"]),
                                            ("explain", ["explain", "CELL", "-o", "cams"]),
                                            ("explain", ["predict", "CELL", "--cam", "cams", "-o", "p.csv"])])
def test_a_missing_extra_is_named_in_one_line(ensemble_dir, tmp_path, without_extras, extra, command):
    cell = write_cell(tmp_path / "UID_3_1_1_all.png", size=80)
    args = [a.replace("CELL", str(cell)) if a == "CELL" else a for a in command]
    done = _alldetect(without_extras, args[0], ensemble_dir, *args[1:])
    assert done.returncode != 0
    assert f"pip install 'alldetect[{extra}]'" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
