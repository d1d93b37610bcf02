"""The command line under careless input: one-line errors before any work, no silent misreading, no file
skipped without a word, no overlay overwriting another."""

import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.errors import ImageProblem

from helpers import write_cell

runner = CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output, result.output


def _preds(tmp_path, text: str, encoding="utf-8"):
    path = tmp_path / "p.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_output_that_is_a_folder_fails_before_any_work(ensemble_dir, tmp_path, monkeypatch):
    import alldetect.inference.load

    monkeypatch.setattr(alldetect.inference.load, "load_engine", lambda *a, **k: pytest.fail("work started"))
    write_cell(tmp_path / "cells" / "a.png", size=80)
    _one_line_error(runner.invoke(app, ["predict", str(ensemble_dir), str(tmp_path / "cells"), "-o", str(tmp_path)]),
                    "is a folder")
    _one_line_error(runner.invoke(app, ["index", str(tmp_path / "cells"), "-o", str(tmp_path)]), "is a folder")


def test_evaluate_reads_a_bom_and_refuses_what_it_would_misread(tmp_path):
    good = "path,label,prob_all\na.png,all,0.9\nb.png,hem,0.2\n"
    r = runner.invoke(app, ["evaluate", str(_preds(tmp_path, good, "utf-8-sig"))])
    assert r.exit_code == 0, r.output
    _one_line_error(runner.invoke(app, ["evaluate", str(_preds(tmp_path, "path,label,prob_all\na.png,all,0,9\n"))]),
                    "p.csv:2: 4 fields where the header has 3")
    _one_line_error(runner.invoke(app, ["evaluate", str(_preds(tmp_path, "path,label,prob_all,prob_all\n"
                                                                         "a.png,all,0.9,0.1\n"))]),
                    "prob_all appear more than once")
    _one_line_error(runner.invoke(app, ["evaluate", str(_preds(tmp_path, "path,label,prob_all\né.png,all,0.9\n",
                                                               "latin-1"))]), "not UTF-8")


def test_evaluate_arguments_out_of_range_and_one_class(tmp_path):
    preds = _preds(tmp_path, "path,label,prob_all\na.png,hem,0.9\nb.png,hem,0.2\n")
    r = runner.invoke(app, ["evaluate", str(preds), "--sensitivity", "1.5"])
    assert r.exit_code == 2 and "less than or equal to 1" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(preds), "--ci", "20", "--subjects"])
    assert r.exit_code == 0, r.output  # undefined metrics are NaN with a warning, not a crash
    _one_line_error(runner.invoke(app, ["evaluate", str(preds), "--sensitivity", "0.9"]), "no ALL cells")


def test_index_reports_every_file_it_does_not_index(tmp_path):
    write_cell(tmp_path / "all" / "UID_1_1_1_all.png")
    write_cell(tmp_path / "hem" / "UID_H1_1_1_hem.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "all" / "UID_1_1_2_all.gif")
    (tmp_path / "all" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "hem" / "pipe.png")
    (tmp_path / "labels.csv").write_text("a,b\n")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    result = index_folder(tmp_path)
    problems = {p.path.rsplit("/", 1)[-1]: p.problem for p in result.problems}
    assert len(result.rows) == 2
    assert "not a cell image format" in problems["UID_1_1_2_all.gif"]
    assert "broken symbolic link" in problems["dangling.png"]
    assert "not a regular file" in problems["pipe.png"]
    assert "labels.csv" not in problems and ".DS_Store" not in problems


def test_float_tiffs_are_scaled_or_refused_never_black(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 400).astype(np.float32)
    Image.fromarray(disc * 0.8, mode="F").save(tmp_path / "unit.tif")
    pixels, note = read_rgb(tmp_path / "unit.tif")
    assert pixels[32, 32].tolist() == [204, 204, 204] and pixels[0, 0].tolist() == [0, 0, 0]
    assert "scaled" in note
    Image.fromarray(disc * 4000, mode="F").save(tmp_path / "wide.tif")
    with pytest.raises(ImageProblem, match="outside 0-1 and 0-255"):
        read_rgb(tmp_path / "wide.tif")


def test_overlays_of_cells_with_the_same_file_name_do_not_overwrite_each_other(ensemble_dir, tmp_path):
    for folder, value in (("a", 60), ("b", 200)):
        write_cell(tmp_path / folder / "cell.png", size=80, value=value)
    r = runner.invoke(app, ["explain", str(ensemble_dir), str(tmp_path / "a" / "cell.png"),
                            str(tmp_path / "b" / "cell.png"), "-o", str(tmp_path / "cam"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    written = sorted(p.name for p in (tmp_path / "cam").glob("cell_row*_mobilenet.png"))
    assert written == ["cell_row1_mobilenet.png", "cell_row2_mobilenet.png"]
