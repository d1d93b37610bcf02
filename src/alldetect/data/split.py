"""Subject-level splits. Cells of one subject share stain, microscope and class, so a model can learn the
subject instead of the cell: every split is by subject, stratified by class, and no subject is ever on
two sides. Unlabelled rows are left without a split.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

from ..errors import DataError
from ..formats.manifest import ManifestRow

logger = logging.getLogger(__name__)

PAPER_VAL_FRACTION = 0.3  # Table 3: 15 of 47 ALL and 7 of 26 HEM training subjects go to validation
SUBJECT_FRACTIONS = {"val_fraction": 0.2, "test_fraction": 0.2}  # any other manifest: of each class's subjects
MOST_FOLDS = 5  # cross-fitting: more folds train each model on more donors, but cost more trainings


def subject_key(row: ManifestRow) -> str:
    """The unit that must not cross splits: the subject, or the image itself when the subject is unknown."""
    return row.subject or f"image:{row.path}"


def subject_split(rows: list[ManifestRow], *, val_fraction: float = SUBJECT_FRACTIONS["val_fraction"],
                  test_fraction: float = SUBJECT_FRACTIONS["test_fraction"],
                  seed: int = 0, every_class: bool = False) -> list[ManifestRow]:
    """Assign ``train``/``val``/``test`` by subject, stratified by class, reproducibly for ``seed``.

    Each class's subjects are shuffled and cut by the fractions (a non-zero fraction gets at least one
    subject when the class has three or more, or two or more with ``every_class``; one subject of each
    class always stays in train). Returns new rows in the input order.
    """
    _check_fractions(val_fraction, test_fraction)
    assignment = _assign_subjects(_labelled(rows), {"test": test_fraction, "val": val_fraction}, seed,
                                  at_least_one_from=2 if every_class else 3)
    return _apply(rows, assignment)


def paper_split(rows: list[ManifestRow], *, val_fraction: float = PAPER_VAL_FRACTION,
                seed: int = 0) -> list[ManifestRow]:
    """The paper's Table-3 protocol: the preliminary test set is the test split; the training folds are
    split by subject into train and validation (about 70/30 of subjects per class)."""
    labelled = _labelled(rows)
    test = [r for r in labelled if r.source == "prelim"]
    if not test:
        raise DataError("the paper protocol needs the labelled preliminary test set (source 'prelim'), "
                        "which this manifest lacks; use --val-fraction/--test-fraction instead")
    test_subjects = {subject_key(r) for r in test}
    development = [r for r in labelled if r.source != "prelim"]
    shared = sorted({subject_key(r) for r in development} & test_subjects)
    if shared:
        raise DataError(f"subject(s) {', '.join(shared[:10])} appear in the preliminary test set and in the "
                        "training data; the paper protocol would leak them")
    assignment = _assign_subjects(development, {"val": val_fraction}, seed)
    assignment.update({s: "test" for s in test_subjects})
    return _apply(rows, assignment)


def subject_folds(rows: list[ManifestRow], n_folds: int, *, seed: int = 0) -> dict[str, int]:
    """Map every labelled subject to one of ``n_folds`` folds, stratified by class: each class's subjects are
    shuffled and dealt round-robin, so every fold holds out subjects of both classes when each class has at
    least ``n_folds`` subjects, and every subject is held out exactly once.

    Donors are dealt, not cells: scikit-learn's ``StratifiedGroupKFold`` balances the cells' class proportions,
    and with donors of 1 to 112 cells it can leave a fold without a healthy donor."""
    labelled = _labelled(rows)
    per_class = Counter(_subject_classes(labelled).values())
    if n_folds < 2 or min(per_class.values()) < n_folds:
        raise DataError(f"{n_folds} subject folds need at least {n_folds} subjects of each class; "
                        f"the data has {dict(sorted(per_class.items()))}")
    rng = np.random.default_rng(seed)
    folds, dealt = {}, 0
    for label, subjects in sorted(_subjects_by_class(labelled).items()):
        subjects = sorted(subjects)
        rng.shuffle(subjects)
        for i, subject in enumerate(subjects):
            folds[subject] = (dealt + i) % n_folds
        dealt += len(subjects)  # the next class starts where this one stopped: folds stay even in size
    return folds


def default_folds(rows: list[ManifestRow], *, most: int = MOST_FOLDS) -> int:
    """How many folds a cross-fit of ``rows`` uses: ``most``, or fewer so that every fold holds out at least one
    donor of each class."""
    per_class = Counter(_subject_classes(_labelled(rows)).values())
    folds = min(most, *per_class.values())
    if folds < 2:
        raise DataError(f"cross-fitting needs at least 2 subjects of each class; the data has "
                        f"{dict(sorted(per_class.items()))}")
    return folds


def fold_splits(rows: list[ManifestRow], folds: dict[str, int], fold: int) -> list[ManifestRow]:
    """Fold ``fold``'s manifest of a cross-fit: its donors are ``val``, every other labelled donor ``train``
    (unlabelled rows stay without a split)."""
    return _apply(rows, {s: "val" if f == fold else "train" for s, f in folds.items()})


def check_subject_disjoint(rows: list[ManifestRow]) -> None:
    """Raise ``DataError`` naming the subjects that sit in more than one split."""
    splits: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.split:
            splits[subject_key(r)].add(r.split)
    leaked = sorted(s for s, where in splits.items() if len(where) > 1)
    if leaked:
        detail = "; ".join(f"{s} in {'/'.join(sorted(splits[s]))}" for s in leaked[:10])
        raise DataError(f"{len(leaked)} subject(s) appear in more than one split ({detail}): "
                        "results would be optimistic; re-split by subject")


def _labelled(rows: list[ManifestRow]) -> list[ManifestRow]:
    labelled = [r for r in rows if r.label]
    if not labelled:
        raise DataError("the manifest has no labelled images to split")
    classes = {r.label for r in labelled}
    if len(classes) < 2:
        raise DataError(f"the manifest holds only {classes.pop().upper()} images; both all and hem are needed")
    return labelled


def _check_fractions(*fractions: float) -> None:
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise DataError(f"split fractions {fractions} must each be in [0, 1) and sum to less than 1")


def _assign_subjects(rows: list[ManifestRow], fractions: dict[str, float], seed: int, *,
                     at_least_one_from: int = 3) -> dict[str, str]:
    """Map subject -> split. ``fractions`` are taken in order from each class's shuffled subjects; the
    rest is ``train``. A non-zero fraction takes at least one subject of a class with ``at_least_one_from``
    subjects or more."""
    by_class = _subjects_by_class(rows)
    rng = np.random.default_rng(seed)
    assignment = {}
    for label in sorted(by_class):
        subjects = sorted(by_class[label])
        rng.shuffle(subjects)
        start = 0
        for split, fraction in fractions.items():
            left = len(subjects) - start
            take = round(len(subjects) * fraction)
            if fraction > 0 and take == 0 and len(subjects) >= at_least_one_from:
                take = 1
            take = min(take, left - 1)  # keep at least one training subject per class
            assignment.update({s: split for s in subjects[start:start + take]})
            start += max(take, 0)
        assignment.update({s: "train" for s in subjects[start:]})
    return assignment


def _subject_classes(rows: list[ManifestRow]) -> dict[str, str]:
    """Each subject's class (the majority of its cells' labels; a mixed subject is warned about)."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        votes[subject_key(r)][r.label] += 1
    classes = {}
    for subject, counts in votes.items():
        if len(counts) > 1:
            logger.warning("subject %s has cells of both classes %s; stratified as %s",
                           subject, dict(counts), counts.most_common(1)[0][0])
        classes[subject] = counts.most_common(1)[0][0]
    return classes


def _subjects_by_class(rows: list[ManifestRow]) -> dict[str, list[str]]:
    by_class: dict[str, list[str]] = defaultdict(list)
    for subject, label in _subject_classes(rows).items():
        by_class[label].append(subject)
    return by_class


def _apply(rows: list[ManifestRow], assignment: dict[str, str]) -> list[ManifestRow]:
    out = [r.with_split(assignment.get(subject_key(r), "") if r.label else "") for r in rows]
    check_subject_disjoint(out)
    return out
