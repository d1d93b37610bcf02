"""A decoded-and-cropped image cache: uint8, memory-mapped on disk, so epochs after the first never decode
an image file again. Keyed by the files (path, size, mtime) and the preprocessing, so a changed file or
crop builds a new cache instead of serving stale pixels."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ImageProblem
from ..formats.problems import Problem
from .images import read_rgb
from .geometry import Preprocess

logger = logging.getLogger(__name__)
_FORMAT_VERSION = 1


@dataclass
class CropCache:
    images: np.ndarray            # (N, S, S, 3) uint8, memory-mapped read-only
    problems: dict[int, Problem]  # rows that could not be decoded or cropped (their pixels are zeros)

    @property
    def usable(self) -> np.ndarray:
        """Boolean mask of the rows with real pixels."""
        mask = np.ones(len(self.images), dtype=bool)
        mask[list(self.problems)] = False
        return mask


def load_crops(paths: list[str], preprocess: Preprocess, *, cache_dir: str | Path, workers: int = 4) -> CropCache:
    """Every image as the model's input (see ``Preprocess``), through the disk cache."""
    side = preprocess.side
    key = _cache_key(paths, preprocess.crop, side)
    cache_dir = Path(cache_dir)
    data_file, meta_file = cache_dir / f"crops-{side}-{key}.npy", cache_dir / f"crops-{side}-{key}.json"
    if not (data_file.is_file() and meta_file.is_file()):
        _build(paths, preprocess, data_file, meta_file, workers)
    else:
        logger.info("reusing cached crops %s", data_file)
    meta = json.loads(meta_file.read_text())
    images = np.load(data_file, mmap_mode="r")
    problems = {int(i): Problem(**p) for i, p in meta["problems"].items()}
    return CropCache(images, problems)


def _cache_key(paths: list[str], crop: int, side: int) -> str:
    h = hashlib.sha256(json.dumps([_FORMAT_VERSION, crop, side]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def _build(paths: list[str], preprocess: Preprocess, data_file: Path, meta_file: Path, workers: int) -> None:
    side = preprocess.side
    data_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_file.with_name(data_file.name + f".{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), side, side, 3))
    problems: dict[int, dict] = {}

    def attempt(path: str) -> np.ndarray | ImageProblem:
        try:
            return preprocess.apply(read_rgb(path)[0], name=path)
        except ImageProblem as e:
            return e

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(attempt, paths)
        for i, result in enumerate(tqdm(results, total=len(paths), desc=f"caching {side}px crops", unit="img",
                                        disable=None)):
            if isinstance(result, ImageProblem):
                problems[i] = {"path": result.path, "problem": result.reason, "action": "skipped"}
                logger.warning("%s: %s (skipped)", result.path, result.reason)
            else:
                array[i] = result
    array.flush()
    del array
    os.replace(tmp, data_file)
    meta_tmp = meta_file.with_name(meta_file.name + ".tmp")
    meta_tmp.write_text(json.dumps({"crop": preprocess.crop, "side": side, "count": len(paths), "problems": problems}))
    os.replace(meta_tmp, meta_file)
