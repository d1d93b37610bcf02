import csv
import hashlib
import json

import numpy as np
from PIL import Image

from alldetect.data.names import parse_cell_name
from alldetect.data.synth import SynthConfig, generate


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.bmp")) + sorted(root.rglob("*.csv")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_writes_the_exact_cnmc_layout(tiny_synth):
    folds = sorted(p.name for p in (tiny_synth / "training_data").iterdir())
    assert folds == ["fold_0", "fold_1", "fold_2"]
    for fold in folds:
        assert sorted(p.name for p in (tiny_synth / "training_data" / fold).iterdir()) == ["all", "hem"]
    prelim = tiny_synth / "validation_data" / "C-NMC_test_prelim_phase_data"
    with open(tiny_synth / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv") as f:
        reader = csv.reader(f)
        assert next(reader) == ["Patient_ID", "new_names", "labels"]
        entries = list(reader)
    assert sorted(int(e[1].split(".")[0]) for e in entries) == list(range(1, len(entries) + 1))
    assert {p.name for p in prelim.iterdir()} == {e[1] for e in entries}
    for patient, _, label in entries:
        assert parse_cell_name(patient).label == ("all" if label == "1" else "hem")
    final = sorted(int(p.stem) for p in (tiny_synth / "testing_data" / "C-NMC_test_final_phase_data").iterdir())
    assert final == list(range(1, 9))
    assert json.loads((tiny_synth / "alldetect-synthetic.json").read_text())["config"]["seed"] == 7


def test_subjects_have_one_class_and_named_by_class(tiny_synth):
    for path in (tiny_synth / "training_data").rglob("*.bmp"):
        name = parse_cell_name(path.name)
        assert name.label == path.parent.name
        assert name.subject.startswith("H") == (name.label == "hem")


def test_images_are_rgb_centred_cells_on_black(tiny_synth):
    for path in sorted((tiny_synth / "training_data").rglob("*.bmp"))[:10]:
        img = Image.open(path)
        assert img.format == "BMP" and img.mode == "RGB" and img.size == (80, 80)
        a = np.asarray(img).astype(int)
        assert (a[0] == 0).all() and (a[:, -1] == 0).all()  # black border
        ys, xs = np.nonzero(a.sum(-1) > 30)
        assert abs(ys.mean() - 39.5) < 6 and abs(xs.mean() - 39.5) < 6


def test_deterministic_per_seed(tmp_path):
    cfg = SynthConfig(size=64, all_subjects=2, hem_subjects=1, test_all_subjects=1, test_hem_subjects=1,
                      final_subjects=1, cells_per_subject=2, seed=3)
    generate(tmp_path / "a", cfg, workers=1)
    generate(tmp_path / "b", cfg, workers=2)
    generate(tmp_path / "c", SynthConfig(**{**cfg.__dict__, "seed": 4}), workers=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_png_format_and_class_ratio(tmp_path):
    counts = generate(tmp_path, SynthConfig(size=64, cells_per_subject=2, image_format="png", final_subjects=0),
                      workers=1)
    assert list((tmp_path / "training_data" / "fold_0" / "all").glob("*.png"))
    assert 2.0 <= counts["train/all"] / counts["train/hem"] <= 2.3  # C-NMC: ~2.15 ALL per HEM image


def test_a_set_without_test_subjects(tmp_path):
    counts = generate(tmp_path, SynthConfig(size=64, all_subjects=2, hem_subjects=1, test_all_subjects=0,
                                            test_hem_subjects=0, final_subjects=0, cells_per_subject=2), workers=1)
    assert set(counts) == {"train/all", "train/hem"}
    assert not (tmp_path / "validation_data").exists() and not (tmp_path / "testing_data").exists()
