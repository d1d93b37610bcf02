from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alldetect.data.index import index_folder
from alldetect.data.split import check_subject_disjoint, paper_split, subject_split
from alldetect.errors import DataError
from alldetect.formats.manifest import ManifestRow


def _rows(subjects: list[tuple[str, str, int]], source: str = "fold_0") -> list[ManifestRow]:
    return [ManifestRow(path=f"{s}_{i}.bmp", label=label, subject=s, source=source)
            for s, label, n in subjects for i in range(n)]


subject_lists = st.lists(
    st.tuples(st.sampled_from(["all", "hem"]), st.integers(1, 6), st.booleans()), min_size=2, max_size=40)


@settings(max_examples=150, deadline=None)
@given(subject_lists, st.floats(0, 0.45), st.floats(0, 0.45), st.integers(0, 2**16))
def test_no_subject_ever_sits_in_two_splits(spec, val, test, seed):
    subjects = [(f"{'H' if label == 'hem' else ''}{i}", label, n) for i, (label, n, _) in enumerate(spec)]
    rows = _rows(subjects)
    # unknown subjects are their own group; sprinkle some in
    rows += [ManifestRow(path=f"anon_{i}.png", label=label) for i, (label, _, anon) in enumerate(spec) if anon]
    if len({r.label for r in rows}) < 2:
        with pytest.raises(DataError):
            subject_split(rows, val_fraction=val, test_fraction=test, seed=seed)
        return
    out = subject_split(rows, val_fraction=val, test_fraction=test, seed=seed)
    where = defaultdict(set)
    for r in out:
        where[r.subject or r.path].add(r.split)
    assert all(len(s) == 1 for s in where.values())
    assert {r.split for r in out} <= {"train", "val", "test"}
    for label in ("all", "hem"):  # every class keeps training subjects
        assert any(r.split == "train" and r.label == label for r in out)
    assert [r.path for r in out] == [r.path for r in rows]


def test_stratified_by_class_and_deterministic():
    rows = _rows([(str(i), "all", 3) for i in range(20)] + [(f"H{i}", "hem", 3) for i in range(10)])
    a = subject_split(rows, val_fraction=0.2, test_fraction=0.3, seed=5)
    assert a == subject_split(rows, val_fraction=0.2, test_fraction=0.3, seed=5)
    assert a != subject_split(rows, val_fraction=0.2, test_fraction=0.3, seed=6)
    subjects = Counter((r.split, r.label) for r in {(r.subject, r.split, r.label): r for r in a}.values())
    assert subjects == {("test", "all"): 6, ("val", "all"): 4, ("train", "all"): 10,
                        ("test", "hem"): 3, ("val", "hem"): 2, ("train", "hem"): 5}


def test_paper_protocol_reproduces_table_3_subject_counts():
    train = _rows([(str(i), "all", 2) for i in range(47)] + [(f"H{i}", "hem", 2) for i in range(26)])
    prelim = _rows([(str(100 + i), "all", 2) for i in range(13)] + [(f"H{100 + i}", "hem", 2) for i in range(15)],
                   source="prelim")
    final = [ManifestRow(path=f"final_{i}.bmp", source="final") for i in range(3)]
    out = paper_split(train + prelim + final, seed=0)
    subjects = Counter((split, label) for _, split, label in {(r.subject, r.split, r.label) for r in out if r.label})
    assert subjects[("test", "all")] == 13 and subjects[("test", "hem")] == 15
    assert subjects[("val", "all")] == 14 and subjects[("val", "hem")] == 8  # paper: 15 and 7 (about 30%)
    assert subjects[("train", "all")] == 33 and subjects[("train", "hem")] == 18
    assert all(r.split == "" for r in out if r.source == "final")
    assert all(r.split == "test" for r in out if r.source == "prelim")


def test_paper_protocol_refuses_a_subject_in_train_and_prelim():
    rows = _rows([("1", "all", 2), ("H1", "hem", 2), ("2", "all", 1)]) + _rows([("1", "all", 1), ("H2", "hem", 1)],
                                                                             source="prelim")
    with pytest.raises(DataError, match="subject.* 1 appear in the preliminary test set"):
        paper_split(rows)


def test_paper_protocol_needs_the_prelim_set():
    with pytest.raises(DataError, match="preliminary test set"):
        paper_split(_rows([("1", "all", 2), ("H1", "hem", 2)]))


def test_leak_check_names_the_subject():
    rows = [ManifestRow("a", "all", "7", "train"), ManifestRow("b", "all", "7", "test")]
    with pytest.raises(DataError, match="7 in test/train"):
        check_subject_disjoint(rows)


def test_paper_split_on_the_synthetic_set(tiny_synth):
    out = paper_split(index_folder(tiny_synth).rows, seed=0)
    check_subject_disjoint(out)
    assert {r.split for r in out if r.source == "prelim"} == {"test"}
    assert {r.split for r in out if r.source.startswith("fold_")} == {"train", "val"}
