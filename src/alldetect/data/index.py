"""Find and label cell images under a folder and turn them into manifest rows.

Recognised, at any depth and in any combination:
  (a) a C-NMC-2019 tree in its known variants: ``fold_<k>/{all,hem}/`` training folds (Kaggle
      ``C-NMC_Leukemia/training_data`` or TCIA ``C-NMC_training_data``), the preliminary test folder with
      its ``Patient_ID,new_names,labels`` CSV (beside the folder, inside it, or the folder nested twice),
      and the unlabelled final test folder;
  (b) any folder with ``all/`` and ``hem/`` subfolders;
  (c) any other images: labelled from a C-NMC file name when it has one, else unlabelled.
Every image is decoded once; files that cannot be used are reported and skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError, ImageProblem
from ..formats.labels import Label
from ..formats.manifest import ManifestRow, nameable
from ..formats.problems import Problem
from .images import read_rgb
from .names import IMAGE_SUFFIXES, is_image_file, parse_cell_name

logger = logging.getLogger(__name__)

PRELIM_HEADER = ("Patient_ID", "new_names", "labels")
SYNTHETIC_MARKER = "alldetect-synthetic.json"
MAX_DEPTH = 64  # folder levels indexed below the root: C-NMC trees are a few deep; Python's walk recurses
_FOLD_DIR = re.compile(r"^fold_?(?P<k>\d+)$", re.IGNORECASE)
_CLASS_DIRS = {"all": "all", "hem": "hem"}
_UNKNOWN_CLASS_NAME = re.compile(r"^(?:UID_)?H?\d+_\d+_\d+_(?P<label>[A-Za-z]+)$", re.IGNORECASE)


@dataclass
class IndexResult:
    rows: list[ManifestRow]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    synthetic: dict | None = None  # the generator's parameters when the folder was made by `alldetect synth`


def index_folder(root: str | Path, *, check_images: bool = True, for_manifest: bool = True,
                 workers: int = 4) -> IndexResult:
    """Index every image under ``root``; see the module docstring for the layouts understood. ``for_manifest``
    skips (and reports) the files a manifest cannot name."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    problems: list[Problem] = []
    files = _files(root, problems)
    images = [p for p in files if is_image_file(p)]
    if not images:
        raise DataError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")

    rows: dict[Path, ManifestRow] = {}
    for csv_path in files:
        if csv_path.suffix.lower() == ".csv" and _is_prelim_csv(csv_path):
            rows.update(_index_prelim(csv_path, images, root, problems))
    class_parents = {d.parent for p in images for d in p.parents if d.name.lower() in _CLASS_DIRS}
    for path in images:
        if path not in rows:
            row = _index_by_folder_or_name(path, root, problems, class_parents)
            if row is not None:
                rows[path] = row
    skipped = {Path(p.path) for p in problems if p.action == "skipped"}
    candidates = [rows[p] for p in images if p in rows and p not in skipped]
    if for_manifest:
        candidates, unnamed = nameable(candidates)
        problems += unnamed
    if check_images:
        candidates = _drop_unreadable(candidates, problems, workers)
    if not candidates:
        raise DataError(f"{root}: none of the {len(images)} image file(s) could be used; see the problems report")

    result = IndexResult(rows=candidates, problems=problems, synthetic=synthetic_marker(root))
    result.warnings = _consistency_warnings(candidates)
    return result


def _files(root: Path, problems: list[Problem]) -> list[Path]:
    """Every regular file under ``root`` (hidden ones aside), linked folders followed; anything else that is not
    a folder, and files that are neither images nor known side files, are reported, never dropped without a
    word."""
    files = []
    for path in _walk(root, problems):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or path.is_dir():
            continue
        if path.is_symlink() and not path.exists():
            problems.append(Problem(str(path), "broken symbolic link (its target does not exist)", "skipped"))
        elif not path.is_file():
            problems.append(Problem(str(path), "not a regular file (a pipe, socket or device)", "skipped"))
        else:
            files.append(path)
            if not is_image_file(path) and not _side_file(path):
                kind = path.suffix or "no suffix"
                problems.append(Problem(str(path), f"not a cell image format this tool reads ({kind}; accepted: "
                                        f"{', '.join(sorted(IMAGE_SUFFIXES))})", "skipped"))
    return files


def _walk(root: Path, problems: list[Problem]) -> list[Path]:
    """Every entry under ``root`` but folders, sorted, following symbolic links to folders (data on shared
    drives is often reached that way) once each: a link back up the tree, or a second link to a folder already
    walked, is reported instead of walked again; so is a folder deeper than ``MAX_DEPTH`` below ``root``."""
    entries, walked = [], set()
    base = len(Path(root).parts)
    for folder, subfolders, names in os.walk(root, followlinks=True):
        if len(Path(folder).parts) - base >= MAX_DEPTH and subfolders:
            problems.append(Problem(folder, f"holds folders more than {MAX_DEPTH} levels below {root}, not indexed "
                                            "(no cell data set nests that deep)", "skipped"))
            subfolders.clear()
        real = os.path.realpath(folder)
        if real in walked:
            problems.append(Problem(folder, "a linked folder already indexed through another path (a link loop, "
                                            "or a second link to it)", "skipped"))
            subfolders.clear()
            continue
        walked.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        entries += [Path(folder) / name for name in names]
    return sorted(entries)


def _side_file(path: Path) -> bool:
    """Files that belong beside a data set: label CSVs, the synthetic marker, read-me and licence texts."""
    return (path.suffix.lower() in (".csv", ".md", ".txt") or path.name == SYNTHETIC_MARKER
            or path.stem.upper() in ("README", "LICENSE", "LICENCE"))


def _is_prelim_csv(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):  # csv.Error: a field beyond the csv module's limit
        return False
    return tuple(h.strip() for h in header) == PRELIM_HEADER


def _index_prelim(csv_path: Path, images: list[Path], root: Path, problems: list[Problem]) -> dict[Path, ManifestRow]:
    """Rows for the labelled preliminary test set; the image folder is found by the names it holds."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            entries = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.append(Problem(str(csv_path), f"labels CSV not readable ({e})", "skipped"))
        return {}
    wanted = {e["new_names"].strip() for e in entries}
    by_folder: dict[Path, dict[str, Path]] = defaultdict(dict)
    for p in images:
        if p.name in wanted:
            by_folder[p.parent][p.name] = p
    if not by_folder:
        problems.append(Problem(str(csv_path), "no folder holds the images this labels CSV names", "skipped"))
        return {}
    folder = max(by_folder, key=lambda d: (len(by_folder[d]), d == csv_path.parent))
    found = by_folder[folder]
    rows = {}
    for line, e in enumerate(entries, start=2):
        name, patient, label_code = e["new_names"].strip(), e["Patient_ID"].strip(), e["labels"].strip()
        where = f"{csv_path}:{line}"
        if name not in found:
            problems.append(Problem(str(folder / name), f"listed in {where} but the file is missing", "skipped"))
            continue
        if label_code not in ("0", "1"):
            problems.append(Problem(str(found[name]), f"{where}: label {label_code!r} is not 0 (HEM) or 1 (ALL)",
                                    "skipped"))
            continue
        label = Label.from_text(label_code).text
        parsed = parse_cell_name(patient)
        if parsed is not None and parsed.label != label:
            problems.append(Problem(str(found[name]), f"{where}: Patient_ID {patient!r} says {parsed.label} "
                                    f"but labels says {label}", "skipped"))
            continue
        rows[found[name]] = ManifestRow(
            path=str(found[name]), label=label, subject=parsed.subject if parsed else "",
            image=parsed.image if parsed else "", cell=parsed.cell if parsed else "", source="prelim")
    return rows


def _index_by_folder_or_name(path: Path, root: Path, problems: list[Problem],
                             class_parents: set[Path]) -> ManifestRow | None:
    """Label from an ``all``/``hem`` folder, else from a C-NMC file name; ``class_parents`` are the folders
    holding such class folders, so an image in a sibling folder has an unknown class."""
    parsed = parse_cell_name(path.name)
    class_dir = next((d for d in path.relative_to(root).parents if d.name.lower() in _CLASS_DIRS), None)
    if class_dir is not None:
        label = _CLASS_DIRS[class_dir.name.lower()]
        if parsed is not None and parsed.label != label:
            problems.append(Problem(str(path), f"file name says {parsed.label} but it is in a folder "
                                    f"named {class_dir.name}", "skipped"))
            return None
        source = _source_name(class_dir.parent, root)
    else:
        unknown = _UNKNOWN_CLASS_NAME.match(path.stem)
        if parsed is None and unknown is not None:
            problems.append(Problem(str(path), f"unknown class {unknown['label']!r} in the file name "
                                    "(expected all or hem)", "skipped"))
            return None
        if parsed is None and path.parent != root and path.parent.parent in class_parents:
            problems.append(Problem(str(path), f"unknown class: folder {path.parent.name!r} is neither "
                                    "'all' nor 'hem'", "skipped"))
            return None
        label = parsed.label if parsed else ""
        source = "final" if "final" in path.parent.name.lower() else _source_name(path.parent.relative_to(root), root)
    return ManifestRow(path=str(path), label=label, subject=parsed.subject if parsed else "",
                       image=parsed.image if parsed else "", cell=parsed.cell if parsed else "", source=source)


def _source_name(folder: Path, root: Path) -> str:
    """``fold_0`` for a challenge fold (the indexed folder itself may be one), else the folder's path below
    the root (``.`` for the root)."""
    for part in (folder, *folder.parents, root):
        fold = _FOLD_DIR.match(part.name)
        if fold:
            return f"fold_{fold['k']}"
    return folder.as_posix() or "."


def _drop_unreadable(rows: list[ManifestRow], problems: list[Problem], workers: int) -> list[ManifestRow]:
    def check(row: ManifestRow) -> Problem | None:
        try:
            _, note = read_rgb(row.path)
        except ImageProblem as e:
            return Problem(e.path, e.reason, "skipped")
        return Problem(row.path, note, "converted") if note else None

    kept = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = pool.map(check, rows)
        for row, outcome in tqdm(zip(rows, outcomes), total=len(rows), desc="checking images", unit="img",
                                 leave=False, disable=None):
            if outcome is not None:
                problems.append(outcome)
            if outcome is None or outcome.action == "converted":
                kept.append(row)
    return kept


def synthetic_marker(path: Path) -> dict | None:
    """The generator's parameters when ``path`` lies in a folder made by `alldetect synth`, else None."""
    for folder in (path, *path.parents):
        marker = folder / SYNTHETIC_MARKER
        if marker.is_file():
            return json.loads(marker.read_text())
    return None


def _consistency_warnings(rows: list[ManifestRow]) -> list[str]:
    warnings = []
    labelled = [r for r in rows if r.label]
    labels = {r.label for r in labelled}
    if labelled and len(labels) == 1:
        warnings.append(f"only {labels.pop().upper()} images were found; a classifier needs both all and hem")
    no_subject = sum(1 for r in labelled if not r.subject)
    if no_subject:
        warnings.append(f"{no_subject} labelled image(s) have no subject in their name: splits will treat each "
                        "as its own subject and cannot guard against subject leakage for them")
    subject_labels: dict[str, set[str]] = defaultdict(set)
    subject_sources: dict[str, set[str]] = defaultdict(set)
    for r in labelled:
        if r.subject:
            subject_labels[r.subject].add(r.label)
            subject_sources[r.subject].add(r.source)
    mixed = sorted(s for s, ls in subject_labels.items() if len(ls) > 1)
    if mixed:
        warnings.append(f"subject(s) with cells of both classes: {', '.join(mixed[:10])}")
    folds = sorted({r.source for r in labelled if r.source.startswith("fold_")})
    if len(folds) > 1:
        shared = sorted(s for s, src in subject_sources.items() if len({x for x in src if x in folds}) > 1)
        if shared:
            warnings.append(f"challenge folds share {len(shared)} subject(s) ({', '.join(shared[:10])}): "
                            "the folds are not subject-disjoint; split by subject, not by fold")
        else:
            logger.info("checked: the %d challenge folds are subject-disjoint", len(folds))
    prelim = {r.subject for r in labelled if r.source == "prelim" and r.subject}
    training = {r.subject for r in labelled if r.source.startswith("fold_")}
    if prelim & training:
        warnings.append(f"subject(s) in both the training folds and the preliminary test set: "
                        f"{', '.join(sorted(prelim & training)[:10])}")
    return warnings
