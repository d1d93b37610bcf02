"""alldetect as a library: ``alldetect.load(folder).predict(images)`` gives what ``alldetect predict`` writes, for
files, folders, arrays and PIL images, with the same calls and patients."""

import csv
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import alldetect
from helpers import write_cell


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-cells")
    for name, value in (("UID_3_1_1_all.png", 90), ("UID_3_1_2_all.png", 120), ("UID_H2_1_1_hem.png", 60)):
        write_cell(root / name, size=80, value=value)
    (root / "broken.png").write_bytes(b"not an image")
    return root


def test_the_readme_lines_give_the_predict_commands_rows_and_patients(ensemble_dir, cells, tmp_path):
    from typer.testing import CliRunner

    from alldetect.cli import app

    done = CliRunner().invoke(app, ["predict", str(ensemble_dir), str(cells), "-o", str(tmp_path / "p.csv"),
                                    "--device", "cpu"])
    assert done.exit_code == 1, done.output  # one unreadable file
    with open(tmp_path / "p.csv", newline="") as f:
        written = list(csv.DictReader(f))
    with open(tmp_path / "p.patients.csv", newline="") as f:
        patients = list(csv.DictReader(f))

    ensemble = alldetect.load(ensemble_dir, device="cpu")
    table = ensemble.predict(cells)
    assert table.columns == list(written[0]) and "call" in table.columns
    assert [r["path"] for r in table] == [r["path"] for r in written]
    assert table["call"] == [r["call"] for r in written]
    assert table["prob_all"] == pytest.approx([float(r["prob_all"]) if r["prob_all"] else np.nan for r in written],
                                              nan_ok=True)
    assert [r["error"] for r in table] == [r["error"] for r in written] and table.scored == 3
    keys = ("subject", "cells", "flagged_all", "call", "truth")
    assert [{k: str(p[k]) for k in keys} for p in table.patients()] == [{k: p[k] for k in keys} for p in patients]
    assert ensemble.members == ["mobilenet", "efficientnet_lite0"] and ensemble.operating_point.cell_threshold


def test_arrays_pil_images_and_files_score_alike(ensemble_dir, cells):
    ensemble = alldetect.load(ensemble_dir, device="cpu", engine="torch")
    path = cells / "UID_3_1_1_all.png"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    table = ensemble.predict([path, rgb, Image.open(path), cells / "missing.png", np.zeros((4, 4, 3))],
                             subjects=["3", "3", "3", "3", "3"])
    prob = table["prob_all"]
    assert prob[1] == pytest.approx(prob[0], abs=1e-6) and prob[2] == pytest.approx(prob[0], abs=1e-6)
    assert table["path"][1:3] == ["image 1", "image 2"]
    assert "file not found" in table["error"][3] and np.isnan(prob[3])
    assert "float64 array of shape (4, 4, 3) is not an image" in table["error"][4]
    assert [p["cells"] for p in table.patients()] == [3]  # the scored ones, as predict's patients file counts
    with pytest.raises(alldetect.errors.AlldetectError, match="2 subjects for 1 images"):
        ensemble.predict(rgb, subjects=["a", "b"])
    with pytest.raises(alldetect.errors.AlldetectError, match="patient calls need the cells' subjects"):
        ensemble.predict(rgb).patients()
    mixed = ensemble.predict([path, rgb])  # a cell without a subject is left out of the patients, not fatal
    assert [p["subject"] for p in mixed.patients()] == ["3"]


def test_to_pandas_gives_numbers_as_numbers(ensemble_dir, cells):
    pd = pytest.importorskip("pandas")
    frame = alldetect.load(ensemble_dir, device="cpu").predict(cells).to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 4
    assert frame["prob_all"].dtype.kind == "f" and frame["prob_all"].isna().sum() == 1


def test_importing_alldetect_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import alldetect, sys; print('torch' in sys.modules, "
                                                 "callable(alldetect.load))"], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_the_readme_example_runs(ensemble_dir, cells, tmp_path, monkeypatch):
    """README's "As a Python library" block, its scoring lines run as written (the folder and two file names
    put in; training and the whole run are tested through the commands)."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### As a Python library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if not line.startswith(("alldetect.train", "alldetect.run"))]
    code = "\n".join(lines).replace('"runs/demo/ensemble"', repr(str(ensemble_dir))) \
        .replace('["a.bmp", "b.png"]', repr([str(cells / "UID_3_1_1_all.png"), str(cells / "UID_H2_1_1_hem.png")]))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["cells"].scored == 2 and len(namespace["cells"].patients()) == 2


def test_each_bad_item_is_one_error_row_and_the_good_ones_are_scored(ensemble_dir, cells, tmp_path):
    ensemble = alldetect.load(ensemble_dir, device="cpu", engine="torch")
    good = cells / "UID_3_1_1_all.png"
    closed = Image.open(good)
    closed.close()
    truncated_file = tmp_path / "truncated.png"
    truncated_file.write_bytes(good.read_bytes()[:200])
    frames = [Image.new("RGB", (80, 80), (v, 0, v)) for v in (60, 90)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    items = [good, None, good.read_bytes(), b"not an image", closed, Image.open(good).convert("LA").convert("La"),
             Image.open(truncated_file), "a\0b.png", "x" * 300 + ".png", Image.open(io.BytesIO(gif.getvalue())),
             np.asarray(Image.open(good).convert("RGB"))]
    table = ensemble.predict(items)
    assert len(table) == len(items)
    prob, errors = table["prob_all"], table["error"]
    scored = [i for i, p in enumerate(prob) if np.isfinite(p)]
    assert scored == [0, 2, 10] and prob[2] == pytest.approx(prob[0]) and prob[10] == pytest.approx(prob[0])
    assert all(errors[i] for i in range(len(items)) if i not in scored)
    assert "NoneType is not an image" in errors[1] and "holds 2 pages" in errors[9]
    assert ensemble.predict(good.read_bytes()).scored == 1  # the bytes of a file are one image, not 37,686 ints
