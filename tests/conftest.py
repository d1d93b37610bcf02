from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import alldetect._torchvision  # noqa: F401  (before any test imports timm or torchvision)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def write_cell(path: Path, *, size: int = 64, value: int = 90, mode: str = "RGB") -> Path:
    """A small bright disc on black, saved in whatever format the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[disc] = (value, value // 3, value)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A small synthetic C-NMC tree (80 px frames), generated once per test session."""
    from alldetect.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(size=80, all_subjects=6, hem_subjects=3, test_all_subjects=2, test_hem_subjects=2,
                               final_subjects=2, cells_per_subject=4, seed=7), workers=1)
    return root


@pytest.fixture
def real_cells(tmp_path) -> Path:
    """A few real C-NMC cells (shipped fixtures) copied where tests may write."""
    target = tmp_path / "real"
    shutil.copytree(FIXTURES / "cnmc", target)
    return target


@pytest.fixture(scope="session")
def split_manifest(tmp_path_factory) -> Path:
    """The paper split of a small synthetic set (80 px frames), for training tests."""
    from alldetect.data.index import index_folder
    from alldetect.formats.manifest import write_manifest
    from alldetect.data.split import paper_split
    from alldetect.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("train-data")
    generate(root / "data", SynthConfig(size=80, all_subjects=6, hem_subjects=3, test_all_subjects=2,
                                        test_hem_subjects=1, final_subjects=1, cells_per_subject=4, seed=11),
             workers=1)
    manifest = root / "manifest.csv"
    write_manifest(paper_split(index_folder(root / "data").rows, seed=0), manifest)
    return manifest


def tiny_config(manifest: Path, out: Path, **overrides):
    """A seconds-long CPU training config: MobileNet, 64 px crops, random init."""
    from alldetect.training import TrainConfig

    base = dict(member="mobilenet", manifest=str(manifest), out=str(out), crop=64, epochs=2, batch_size=8,
                clr_step_epochs=1, pretrained=False, device="cpu", workers=0, seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def member_runs(split_manifest, tmp_path_factory) -> list[Path]:
    """Two members trained for one epoch on the tiny synthetic split."""
    from alldetect.training import fit

    root = tmp_path_factory.mktemp("members")
    return [fit(tiny_config(split_manifest, root / m, member=m, epochs=1)) for m in ("mobilenet", "densenet121")]


@pytest.fixture(scope="session")
def ensemble_dir(member_runs, tmp_path_factory) -> Path:
    from alldetect.ensemble.build import build_ensemble

    out = tmp_path_factory.mktemp("ensemble")
    build_ensemble(member_runs, out)
    return out


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1"):
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields its base URL and the server."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
