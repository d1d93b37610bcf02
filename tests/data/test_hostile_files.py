"""Crafted files against the readers: a TIFF of many pages, a page that breaks its decoder, a frame whose rescale
would be huge, a tree deeper than Python recurses, a CSV field beyond the csv module's limit, digits that only
look like 0-9, and output paths that are not regular files."""

import io
import os
import stat

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from alldetect.data.geometry import FrameGeometry
from alldetect.data.images import decode_rgb, read_rgb
from alldetect.data.index import MAX_DEPTH, index_folder
from alldetect.data.names import parse_cell_name
from alldetect.errors import DataError, ImageProblem
from alldetect.formats.csvfiles import write_csv_atomic

from helpers import write_cell


def _pages(n: int) -> bytes:
    pages = [Image.new("L", (1, 1)) for _ in range(n)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def test_a_tiff_of_many_pages_is_refused_without_counting_them(monkeypatch):
    def counted(_self):
        raise AssertionError("every page was walked to count them")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(counted))
    with pytest.raises(ImageProblem, match="holds more than 16 pages"):
        decode_rgb(io.BytesIO(_pages(50)), name="pages.tif")


def test_a_page_that_breaks_its_decoder_is_one_problem_naming_the_file(tmp_path, monkeypatch):
    path = write_cell(tmp_path / "cell.png")

    def broken(_self):
        raise TypeError("'NoneType' object is not subscriptable")  # a TIFF page without a size

    monkeypatch.setattr(Image.Image, "load", broken)
    with pytest.raises(ImageProblem, match="corrupt or truncated image .TypeError"):
        read_rgb(path)


def test_a_rescale_is_refused_before_it_makes_more_pixels_than_the_limit():
    thin = np.zeros((2000, 1, 3), np.uint8)  # 1x2000: its shorter side to 450 would be 450x900,000 pixels
    with pytest.raises(ImageProblem, match="beyond the 4,000,000-pixel limit"):
        FrameGeometry(frame_size=450, max_pixels=4_000_000).crop(thin, 300, name="thin.png")
    assert FrameGeometry(frame_size=450).crop(np.zeros((900, 600, 3), np.uint8), 300, name="ok").shape == (300, 300, 3)


def test_a_tree_deeper_than_python_recurses_is_indexed_with_a_problem(tmp_path):
    write_cell(tmp_path / "UID_1_1_1_all.png")
    levels = [tmp_path]
    for _ in range(1200):  # one level at a time: mkdir(parents=True) recurses, and so does rmtree
        levels.append(levels[-1] / "d")
        levels[-1].mkdir()
    write_cell(levels[-1] / "UID_2_1_1_all.png")
    try:
        result = index_folder(tmp_path)
    finally:
        (levels[-1] / "UID_2_1_1_all.png").unlink()
        for level in reversed(levels[1:]):
            level.rmdir()
    assert [r.subject for r in result.rows] == ["1"]
    assert any(f"more than {MAX_DEPTH} levels" in p.problem for p in result.problems)


def test_a_csv_with_a_field_beyond_the_csv_modules_limit_does_not_stop_the_index(tmp_path):
    write_cell(tmp_path / "UID_1_1_1_all.png")
    (tmp_path / "notes.csv").write_text("x" * (200 * 1024) + ",b\n")
    assert [r.subject for r in index_folder(tmp_path).rows] == ["1"]


@pytest.mark.parametrize("name", ["UID_\uff11_1_1_all.bmp", "UID_\U0001d7cf_1_1_all.bmp", "UID_\u0661_1_1_all.bmp"])
def test_digits_that_only_look_like_0_to_9_name_no_patient(name):
    assert parse_cell_name("UID_1_1_1_all.bmp").subject == "1"
    assert parse_cell_name(name) is None


def test_an_output_that_is_a_device_a_pipe_or_a_link_to_one_is_refused_never_replaced(tmp_path):
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    link = tmp_path / "link.csv"
    link.symlink_to(device)
    for target in (device, pipe, link):
        with pytest.raises(DataError, match="not a regular file"):
            write_csv_atomic(target, ["a"], [{"a": 1}])
    assert stat.S_ISCHR(device.stat().st_mode) and stat.S_ISFIFO(os.lstat(pipe).st_mode) and link.is_symlink()


def test_an_output_keeps_its_mode_and_a_link_to_a_file_stays_a_link(tmp_path):
    existing = tmp_path / "shared.csv"
    existing.write_text("old\n")
    existing.chmod(0o644)
    write_csv_atomic(existing, ["a"], [{"a": 1}])
    assert stat.S_IMODE(existing.stat().st_mode) == 0o644

    umask = os.umask(0o022)
    try:
        write_csv_atomic(tmp_path / "new.csv", ["a"], [{"a": 1}])
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o644

    link = tmp_path / "latest.csv"
    link.symlink_to(existing)
    write_csv_atomic(link, ["a"], [{"a": 2}])
    assert link.is_symlink() and existing.read_text().splitlines() == ["a", "2"]
