"""The command line under careless input: one-line errors before any work, no silent misreading, no file
skipped without a word, no overlay overwriting another."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.errors import ImageProblem
from alldetect.formats.manifest import read_manifest

from helpers import write_cell

runner = CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output, result.output


def _csv_rows(path) -> list[dict]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


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


def test_an_output_name_too_long_for_the_file_system_fails_before_any_work(ensemble_dir, tmp_path, monkeypatch):
    import alldetect.inference.load

    monkeypatch.setattr(alldetect.inference.load, "load_engine", lambda *a, **k: pytest.fail("work started"))
    write_cell(tmp_path / "cells" / "a.png", size=80)
    out = tmp_path / ("p" * 240 + ".csv")  # fits, but its .patients.csv and temporary files would not
    _one_line_error(runner.invoke(app, ["predict", str(ensemble_dir), str(tmp_path / "cells"), "-o", str(out)]),
                    "file name is too long")


def test_names_that_are_not_utf8_or_hide_characters_are_scored_and_shown_escaped(ensemble_dir, tmp_path):
    """A Latin-1 name from a shared drive is scored (shown with a \\x escape), a bidi mark cannot disguise a
    name; a manifest, which must name the file exactly, skips the Latin-1 one and says so."""
    cells = tmp_path / "cells"
    write_cell(cells / "good.png", size=80)
    write_cell(cells / os.fsdecode(b"caf\xe9.png"), size=80)
    write_cell(cells / "x\u202egnp.png", size=80)
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(cells), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    rows = {Path(row["path"]).name: row for row in _csv_rows(tmp_path / "p.csv")}
    assert set(rows) == {"good.png", "caf\\xe9.png", "x\\u202egnp.png"}
    assert all(row["prob_all"] for row in rows.values())
    r = runner.invoke(app, ["index", str(cells), "-o", str(tmp_path / "m.csv")])
    assert r.exit_code == 0, r.output
    assert len(read_manifest(tmp_path / "m.csv")) == 2
    problems = _csv_rows(tmp_path / "m.problems.csv")
    assert [Path(p["path"]).name for p in problems] == ["caf\\xe9.png"] and "not UTF-8" in problems[0]["problem"]


def test_what_the_decoder_did_to_a_cell_is_in_the_csv(ensemble_dir, tmp_path):
    cells = tmp_path / "cells"
    write_cell(cells / "plain.png", size=80)
    rgba = np.dstack([np.asarray(Image.open(cells / "plain.png")), np.full((80, 80), 255, np.uint8)])
    rgba[:20, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(cells / "half.png")
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(cells), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    warnings = {Path(row["path"]).name: row["warning"]
                for row in _csv_rows(tmp_path / "p.csv")}
    assert "composited onto black" in warnings["half.png"] and warnings["plain.png"] == ""


def test_a_special_file_named_on_the_command_line_gets_its_own_error_under_the_name_given(ensemble_dir, tmp_path):
    """A link to /dev/zero and a named pipe: each is said to be no regular file (not "empty"), and the CSV names
    the file as it was given, not what the link points to."""
    zero = tmp_path / "UID_3_1_1_all.png"
    zero.symlink_to("/dev/zero")
    pipe = tmp_path / "UID_3_1_2_all.png"
    os.mkfifo(pipe)
    good = write_cell(tmp_path / "UID_3_1_3_all.png", size=80)
    out = tmp_path / "p.csv"
    r = runner.invoke(app, ["predict", str(ensemble_dir), str(zero), str(pipe), str(good), "-o", str(out),
                            "--device", "cpu"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    with open(out, newline="") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    for name in (zero.name, pipe.name):
        assert "not a regular file" in rows[name]["error"] and "/dev/zero" not in rows[name]["path"]
    assert rows[good.name]["prob_all"]


def test_names_that_look_alike_are_written_alike_and_escapes_cannot_be_faked(tmp_path):
    from alldetect.formats.csvfiles import formula_safe, printable

    assert printable("cafe\u0301.png") == printable("caf\u00e9.png")  # NFD and NFC: one name
    assert printable("a\\u202e.png") != printable("a\u202e.png")  # typed escape text against the real mark
    for text in ("=1+1.zip", ";=1+1.zip", "a,@SUM(1).png", "\uff1d1+1.png", "x|-2.png", "a\t+1.png"):
        safe = formula_safe(text)
        for separator in (",", ";", "\t", "|"):
            assert all(not part.lstrip().startswith(("=", "+", "-", "@", "\uff1d", "\uff0b", "\uff0d", "\uff20"))
                       for part in safe.split(separator)), (text, safe, separator)


def test_outputs_that_name_a_folder_or_lie_beside_one_fail_before_any_work(ensemble_dir, tmp_path, monkeypatch):
    import alldetect.inference.load

    monkeypatch.setattr(alldetect.inference.load, "load_engine", lambda *a, **k: pytest.fail("work started"))
    write_cell(tmp_path / "cells" / "UID_1_1_1_all.png", size=80)
    cells = str(tmp_path / "cells")
    _one_line_error(runner.invoke(app, ["predict", str(ensemble_dir), cells, "-o", f"{tmp_path}/newdir/"]),
                    "names a folder")
    assert not (tmp_path / "newdir").exists()
    (tmp_path / "out.patients.csv").mkdir()
    _one_line_error(runner.invoke(app, ["predict", str(ensemble_dir), cells, "-o", str(tmp_path / "out.csv")]),
                    "out.patients.csv", "not a regular file")
    os.mkfifo(tmp_path / "pipe.csv")
    _one_line_error(runner.invoke(app, ["predict", str(ensemble_dir), cells, "-o", str(tmp_path / "pipe.csv")]),
                    "not a regular file")


def test_a_path_component_too_long_is_an_error_row_and_the_rest_is_scored(ensemble_dir, tmp_path):
    good = write_cell(tmp_path / "UID_1_1_1_all.png", size=80)
    result = runner.invoke(app, ["predict", str(ensemble_dir), str(good), str(tmp_path / ("x" * 300 + ".png")),
                                 "-o", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    rows = _csv_rows(tmp_path / "p.csv")
    assert rows[0]["prob_all"] and "name too long" in rows[1]["error"].lower()


@pytest.mark.parametrize("args", [["predict", "E", "c", "--batch-size", "-1"], ["serve", "E", "--port", "70000"],
                                  ["serve", "E", "--max-upload-mb", "-5"], ["serve", "E", "--max-files", "0"]])
def test_numbers_out_of_range_are_usage_errors(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output
