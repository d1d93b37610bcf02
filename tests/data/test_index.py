import csv
import shutil
from collections import Counter

import pytest

from alldetect.data.index import index_folder
from helpers import write_cell


def _prelim(folder, entries, csv_path):
    for _patient, new_name, _label in entries:
        write_cell(folder / new_name)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Patient_ID", "new_names", "labels"])
        w.writerows(entries)


PRELIM = [("UID_57_29_1_all.bmp", "1.bmp", 1), ("UID_H49_35_1_hem.bmp", "2.bmp", 0), ("UID_57_2_3_all.bmp", "3.bmp", 1)]


def _training(root):
    write_cell(root / "fold_0" / "all" / "UID_11_10_1_all.bmp")
    write_cell(root / "fold_0" / "hem" / "UID_H10_14_1_hem.bmp")
    write_cell(root / "fold_1" / "all" / "UID_12_1_2_all.bmp")
    write_cell(root / "fold_2" / "hem" / "UID_H11_3_1_hem.bmp")


@pytest.mark.parametrize("variant", ["kaggle", "tcia", "nested_twice", "csv_inside"])
def test_cnmc_layout_variants(tmp_path, variant):
    if variant == "kaggle":
        root = tmp_path / "C-NMC_Leukemia"
        _training(root / "training_data")
        _prelim(root / "validation_data" / "C-NMC_test_prelim_phase_data", PRELIM,
                root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv")
    elif variant == "tcia":
        root = tmp_path
        _training(root / "C-NMC_training_data")
        _prelim(root / "C-NMC_test_prelim_phase_data", PRELIM, root / "C-NMC_test_prelim_phase_data_labels.csv")
    elif variant == "nested_twice":
        root = tmp_path
        _training(root / "training_data")
        nested = root / "validation_data" / "C-NMC_test_prelim_phase_data" / "C-NMC_test_prelim_phase_data"
        _prelim(nested, PRELIM, root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv")
    else:
        root = tmp_path
        _training(root / "training_data")
        folder = root / "validation_data" / "C-NMC_test_prelim_phase_data"
        _prelim(folder, PRELIM, folder / "C-NMC_test_prelim_phase_data_labels.csv")
    for n in (1, 2):
        write_cell(root / "testing_data" / "C-NMC_test_final_phase_data" / f"{n}.bmp")

    result = index_folder(root)
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in result.rows}
    assert not result.problems and not result.warnings
    assert Counter(r.source for r in result.rows) == {"fold_0": 2, "fold_1": 1, "fold_2": 1, "prelim": 3, "final": 2}
    assert (by_name["UID_H10_14_1_hem.bmp"].label, by_name["UID_H10_14_1_hem.bmp"].subject) == ("hem", "H10")
    prelim_2 = next(r for r in result.rows if r.source == "prelim" and r.path.endswith("/2.bmp"))
    assert (prelim_2.label, prelim_2.subject, prelim_2.image, prelim_2.cell) == ("hem", "H49", "35", "1")
    final = [r for r in result.rows if r.source == "final"]
    assert all(r.label == "" and r.subject == "" for r in final)


def test_generic_all_hem_folders_at_any_depth(tmp_path):
    write_cell(tmp_path / "lab" / "2024" / "batch1" / "all" / "cell_a.png")
    write_cell(tmp_path / "lab" / "2024" / "batch1" / "hem" / "cell_b.png")
    write_cell(tmp_path / "other" / "ALL" / "deeper" / "UID_5_1_1_all.png")
    result = index_folder(tmp_path)
    got = {(r.path.rsplit("/", 1)[-1], r.label, r.subject, r.source) for r in result.rows}
    assert got == {("cell_a.png", "all", "", "lab/2024/batch1"), ("cell_b.png", "hem", "", "lab/2024/batch1"),
                   ("UID_5_1_1_all.png", "all", "5", "other")}
    assert any("no subject" in w for w in result.warnings)


def test_folder_of_unlabelled_images(tmp_path):
    for name in ("a.png", "b.jpg", "c.bmp"):
        write_cell(tmp_path / name)
    rows = index_folder(tmp_path).rows
    assert len(rows) == 3 and all(r.label == "" and r.source == "." for r in rows)


def test_cnmc_names_outside_class_folders_are_labelled_by_name(tmp_path):
    write_cell(tmp_path / "UID_3_1_1_all.bmp")
    write_cell(tmp_path / "UID_H3_1_1_hem.bmp")
    assert {(r.label, r.subject) for r in index_folder(tmp_path).rows} == {("all", "3"), ("hem", "H3")}


def test_warns_when_challenge_folds_share_a_subject(tmp_path):
    write_cell(tmp_path / "fold_0" / "all" / "UID_11_1_1_all.bmp")
    write_cell(tmp_path / "fold_1" / "all" / "UID_11_2_1_all.bmp")
    write_cell(tmp_path / "fold_1" / "hem" / "UID_H1_2_1_hem.bmp")
    warnings = index_folder(tmp_path).warnings
    assert any("folds share 1 subject(s) (11)" in w for w in warnings)


def test_synthetic_set_is_recognised(tiny_synth):
    result = index_folder(tiny_synth)
    assert result.synthetic is not None and not result.problems and not result.warnings
    assert len(result.rows) == (6 + 3 + 2 + 2 + 2) * 4


def test_real_cnmc_cells_bmp_and_png(real_cells):
    result = index_folder(real_cells)
    assert not result.problems
    counts = Counter((r.source, r.label) for r in result.rows)
    assert counts == {("fold_1", "all"): 33, ("fold_1", "hem"): 9, ("bmp", "all"): 1, ("bmp", "hem"): 1}
    assert {r.subject for r in result.rows if r.label == "hem"} == {"H10", "H14", "H22"}


def test_index_is_independent_of_a_copied_location(tmp_path, real_cells):
    moved = tmp_path / "moved"
    shutil.copytree(real_cells, moved)
    assert len(index_folder(moved).rows) == len(index_folder(real_cells).rows)


def test_indexing_a_single_fold_keeps_its_name(real_cells):
    rows = index_folder(real_cells / "fold_1").rows
    assert {r.source for r in rows} == {"fold_1"}


def test_linked_folders_are_followed_once_and_link_loops_are_reported(tmp_path):
    shared = tmp_path / "shared-drive" / "fold_0"
    for i in range(3):
        write_cell(shared / "all" / f"UID_1_1_{i}_all.png")
        write_cell(shared / "hem" / f"UID_H1_1_{i}_hem.png")
    data = tmp_path / "data"
    for i in range(2):
        write_cell(data / "fold_1" / "all" / f"UID_2_1_{i}_all.png")
        write_cell(data / "fold_1" / "hem" / f"UID_H2_1_{i}_hem.png")
    (data / "fold_0").symlink_to(shared, target_is_directory=True)  # a batch reached through a link
    (data / "fold_1" / "again").symlink_to(data, target_is_directory=True)  # a link back up: a loop
    result = index_folder(data)
    assert len(result.rows) == 10 and {r.subject for r in result.rows} == {"1", "H1", "2", "H2"}
    assert [p.problem for p in result.problems if "already indexed" in p.problem] != []

    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "all").symlink_to(shared / "all", target_is_directory=True)
    (classes / "hem").symlink_to(shared / "hem", target_is_directory=True)
    assert Counter(r.label for r in index_folder(classes).rows) == {"all": 3, "hem": 3}
