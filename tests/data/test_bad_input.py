"""Every kind of bad input gets a message naming the file and the problem; bad files are skipped, the rest kept."""

import csv
import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.data.cache import load_crops
from alldetect.data.geometry import Preprocess
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.errors import DataError, ImageProblem
from alldetect.formats.manifest import read_manifest
from helpers import write_cell

runner = CliRunner()


def _good_tree(root):
    write_cell(root / "fold_0" / "all" / "UID_1_1_1_all.bmp")
    write_cell(root / "fold_0" / "hem" / "UID_H1_1_1_hem.bmp")


def _problems(result):
    return {p.path.rsplit("/", 1)[-1]: (p.problem, p.action) for p in result.problems}


@pytest.mark.parametrize("name, content, expected", [
    ("UID_2_1_1_all.bmp", b"", "empty file"),
    ("UID_2_1_2_all.bmp", b"this is not an image at all", "not an image"),
    ("UID_2_1_3_all.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt or truncated|not an image"),
])
def test_unreadable_files_are_reported_and_skipped(tmp_path, name, content, expected):
    _good_tree(tmp_path)
    (tmp_path / "fold_0" / "all" / name).write_bytes(content)
    result = index_folder(tmp_path)
    assert len(result.rows) == 2
    problem, action = _problems(result)[name]
    assert action == "skipped"
    assert any(part in problem for part in expected.split("|")), problem


def test_truncated_bmp_is_reported(tmp_path):
    _good_tree(tmp_path)
    full = write_cell(tmp_path / "fold_0" / "all" / "UID_3_1_1_all.bmp", size=200).read_bytes()
    (tmp_path / "fold_0" / "all" / "UID_3_1_1_all.bmp").write_bytes(full[: len(full) // 2])
    problem, action = _problems(index_folder(tmp_path))["UID_3_1_1_all.bmp"]
    assert action == "skipped" and "truncated" in problem


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # tiny file, 36 MP when decoded
    bomb.write_bytes(buf.getvalue())
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageProblem, match="pixel limit"):
        read_rgb(bomb)


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_grayscale_palette_and_16_bit_are_converted_and_reported(tmp_path, mode):
    path = tmp_path / "cell.png"
    write_cell(path, mode=mode if mode != "I;16" else "L")
    if mode == "I;16":
        Image.fromarray((np.asarray(Image.open(path)).astype(np.uint16) * 256)).save(path)
    pixels, note = read_rgb(path)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert note is not None and "converted to RGB" in note
    assert pixels[32, 32].max() > 40 and pixels[0, 0].max() == 0


def test_rgba_transparent_background_becomes_black(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent
    rgba[4:6, 4:6, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    pixels, note = read_rgb(tmp_path / "x.png")
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[5, 5].tolist() == [255, 255, 255]
    assert "96% of pixels (partly) transparent, composited onto black" in note


def test_alpha_that_hides_nothing_or_everything_leaves_the_cell_as_it_is(tmp_path):
    """An opaque alpha channel changes nothing (no note); one that is 0 everywhere (written by tools that mean
    "no alpha") is ignored with a note instead of blacking the cell out."""
    write_cell(tmp_path / "cell.png")
    rgb = np.asarray(Image.open(tmp_path / "cell.png"))
    for alpha, expected_note in ((255, None), (0, "fully transparent: alpha ignored")):
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], alpha, np.uint8)]), "RGBA").save(tmp_path / "a.png")
        pixels, note = read_rgb(tmp_path / "a.png")
        assert np.array_equal(pixels, rgb)
        assert note == expected_note if expected_note is None else expected_note in note


def test_a_multi_page_tiff_and_a_gif_are_refused_with_the_reason(tmp_path):
    """Which page of a TIFF is the cell is not guessed (a blank first page would be scored); GIF's palette
    changes the stain's colours. The command line and the web app refuse both alike."""
    write_cell(tmp_path / "cell.png")
    cell = Image.open(tmp_path / "cell.png")
    Image.new("RGB", cell.size).save(tmp_path / "pages.tif", save_all=True, append_images=[cell])
    with pytest.raises(ImageProblem, match="holds 2 pages; a cell image has one"):
        read_rgb(tmp_path / "pages.tif")
    cell.save(tmp_path / "cell.gif")
    with pytest.raises(ImageProblem, match=r"not an image file .*accepted: BMP, PNG, JPEG, TIFF"):
        read_rgb(tmp_path / "cell.gif")


def test_converted_images_are_kept_and_listed(tmp_path):
    _good_tree(tmp_path)
    write_cell(tmp_path / "fold_0" / "all" / "UID_4_1_1_all.png", mode="L")
    result = index_folder(tmp_path)
    assert len(result.rows) == 3
    assert _problems(result)["UID_4_1_1_all.png"][1] == "converted"


def test_unknown_class_in_name_or_folder(tmp_path):
    _good_tree(tmp_path)
    write_cell(tmp_path / "fold_0" / "UID_5_1_1_blast.bmp")
    write_cell(tmp_path / "fold_0" / "unsure" / "cell.bmp")
    write_cell(tmp_path / "fold_0" / "hem" / "UID_6_1_1_all.bmp")  # name contradicts its folder
    problems = _problems(index_folder(tmp_path))
    assert "unknown class 'blast'" in problems["UID_5_1_1_blast.bmp"][0]
    assert "unknown class: folder 'unsure'" in problems["cell.bmp"][0]
    assert "says all" in problems["UID_6_1_1_all.bmp"][0]


def test_csv_row_naming_a_missing_file(tmp_path):
    _good_tree(tmp_path)
    folder = tmp_path / "C-NMC_test_prelim_phase_data"
    write_cell(folder / "1.bmp")
    with open(tmp_path / "C-NMC_test_prelim_phase_data_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Patient_ID", "new_names", "labels"], ["UID_9_1_1_all.bmp", "1.bmp", 1],
                                 ["UID_9_1_2_all.bmp", "2.bmp", 1], ["UID_H9_1_1_hem.bmp", "3.bmp", "x"]])
    result = index_folder(tmp_path)
    assert sum(r.source == "prelim" for r in result.rows) == 1
    problems = _problems(result)
    assert "labels.csv:3 but the file is missing" in problems["2.bmp"][0]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files found"):
        index_folder(tmp_path / "empty")
    r = runner.invoke(app, ["index", str(tmp_path / "empty"), "--out", str(tmp_path / "m.csv")])
    assert r.exit_code == 1 and "no image files found" in r.output and "Traceback" not in r.output


def test_only_one_class_warns_at_index_and_fails_at_split(tmp_path):
    write_cell(tmp_path / "all" / "UID_1_1_1_all.bmp")
    write_cell(tmp_path / "all" / "UID_2_1_1_all.bmp")
    assert any("only ALL images" in w for w in index_folder(tmp_path).warnings)
    manifest = tmp_path / "m.csv"
    assert runner.invoke(app, ["index", str(tmp_path), "-o", str(manifest)]).exit_code == 0
    r = runner.invoke(app, ["split", str(manifest)])
    assert r.exit_code == 1 and "only ALL images" in r.output


def test_image_smaller_than_the_crop_is_skipped_by_the_cache(tmp_path):
    small = write_cell(tmp_path / "small.png", size=40)
    big = write_cell(tmp_path / "big.png", size=64)
    cache = load_crops([str(small), str(big)], Preprocess(50), cache_dir=tmp_path / "cache")
    assert cache.usable.tolist() == [False, True]
    assert "40x40, smaller than the 50x50 center crop" in cache.problems[0].problem


def test_manifest_with_missing_columns_or_bad_values(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nx.png,all\n")
    with pytest.raises(DataError, match="missing column"):
        read_manifest(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("path,label,subject,split\nx.png,blast,1,train\n")
    with pytest.raises(DataError, match="b.csv:2: label 'blast'"):
        read_manifest(tmp_path / "b.csv")


def test_problems_report_is_written_by_the_cli(tmp_path):
    _good_tree(tmp_path / "data")
    (tmp_path / "data" / "fold_0" / "all" / "UID_7_1_1_all.bmp").write_bytes(b"")
    r = runner.invoke(app, ["index", str(tmp_path / "data"), "-o", str(tmp_path / "m.csv")])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "m.problems.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"path": str(tmp_path / "data" / "fold_0" / "all" / "UID_7_1_1_all.bmp"),
                     "problem": "empty file (0 bytes)", "action": "skipped"}]
