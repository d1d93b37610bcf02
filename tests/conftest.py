from __future__ import annotations

import os
import shutil
from pathlib import Path

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # before torch starts: the workers share the cores, and so do
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))  # their children
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)

import pytest  # noqa: E402

import alldetect._torchvision  # noqa: E402, F401  (before any test imports timm or torchvision)
from helpers import tiny_config  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


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


@pytest.fixture(scope="session")
def member_runs(split_manifest, tmp_path_factory) -> list[Path]:
    """Two members trained for one epoch on the tiny synthetic split: two that export to ONNX quickly (every
    member's export is a slow test, tests/export). EfficientNet-Lite0 starts from the ImageNet weights its pip
    package ships, as the CPU recipe's members do (from random weights, int8 moved the ensemble's P(ALL) by
    0.021, past the 0.02 tests/export allows)."""
    from alldetect.training import fit

    root = tmp_path_factory.mktemp("members")
    return [fit(tiny_config(split_manifest, root / m, member=m, epochs=1, pretrained=m == "efficientnet_lite0"))
            for m in ("mobilenet", "efficientnet_lite0")]


@pytest.fixture(scope="session")
def ensemble_dir(member_runs, tmp_path_factory) -> Path:
    from alldetect.ensemble.build import build_ensemble

    out = tmp_path_factory.mktemp("ensemble")
    build_ensemble(member_runs, out)
    return out
