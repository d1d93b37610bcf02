import os

import numpy as np
import torch

from alldetect.data import cache as cache_module
from alldetect.data.cache import load_crops
from alldetect.data.dataset import CellDataset, oversample_indices
from alldetect.data.images import read_rgb
from alldetect.data.geometry import Preprocess, center_crop
from helpers import write_cell


def test_oversampling_reproduces_the_paper_counts():
    labels = np.array([1] * 5822 + [0] * 2703)
    indices = oversample_indices(labels, seed=0)
    counts = np.bincount(labels[indices])
    assert counts.tolist() == [5822, 5822] and len(indices) == 11644
    assert sorted(set(indices.tolist())) == list(range(len(labels)))  # every image at least once
    np.testing.assert_array_equal(indices, oversample_indices(labels, seed=0))
    assert not np.array_equal(indices, oversample_indices(labels, seed=1))


def test_balanced_labels_are_not_oversampled():
    assert oversample_indices(np.array([0, 1, 0, 1]), seed=0).tolist() == [0, 1, 2, 3]


def test_cache_matches_direct_crop_and_is_reused_without_decoding(tmp_path, monkeypatch, real_cells):
    paths = sorted(str(p) for p in real_cells.rglob("*.png"))[:6]
    first = load_crops(paths, Preprocess(300), cache_dir=tmp_path / "cache")
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(first.images[i], center_crop(read_rgb(p)[0], 300))

    def no_decoding(*_a, **_k):
        raise AssertionError("the cache decoded an image again")

    monkeypatch.setattr(cache_module, "read_rgb", no_decoding)
    again = load_crops(paths, Preprocess(300), cache_dir=tmp_path / "cache")
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images, first.images)


def test_cache_rebuilds_when_a_file_changes(tmp_path):
    path = write_cell(tmp_path / "a.png", size=64, value=90)
    before = load_crops([str(path)], Preprocess(60), cache_dir=tmp_path / "cache").images[0].copy()
    write_cell(path, size=64, value=200)
    os.utime(path, ns=(1, 1))
    after = load_crops([str(path)], Preprocess(60), cache_dir=tmp_path / "cache").images[0]
    assert after.max() > before.max()


def test_cache_resizes_after_cropping(tmp_path):
    path = write_cell(tmp_path / "a.png", size=90)
    cache = load_crops([str(path)], Preprocess(60, 30), cache_dir=tmp_path / "cache")
    assert cache.images.shape == (1, 30, 30, 3)


def test_dataset_yields_uint8_chw_and_labels():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    ds = CellDataset(images, np.array([1, 0, 1]))
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == 0
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(images[1]))
