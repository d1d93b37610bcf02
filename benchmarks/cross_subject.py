"""Cross-subject yardstick: how well recipes call cells and subjects that training never saw.

Subjects are dealt into folds (stratified by class, so each healthy donor is held out exactly once); for each
fold, every recipe trains every member on the other subjects, with a subject-disjoint validation split inside
them (one subject of each class at least), fits the ensemble combiners on that validation split, and scores
the held-out subjects with and without test-time augmentation (the eight flips and 90-degree rotations).
Out-of-fold predictions are pooled over the folds and scored once: cell AUC, BA, WFS, sensitivity,
specificity (threshold 0.5) and subjects called right (mean P(ALL) >= 0.5).

    python benchmarks/cross_subject.py                                    # paper vs plus, the three Lite members
    python benchmarks/cross_subject.py --recipe plus --recipe plus-e12=plus:epochs=12
    python benchmarks/cross_subject.py --data DIR --members densenet121,mobilenet --input-size 224

A recipe is ``NAME`` (a profile) or ``NAME=PROFILE:field=value,...`` (TrainConfig fields). Finished member runs
are reused, so an interrupted run resumes. Prints one table and writes ``<out>/cross_subject.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

import alldetect._torchvision  # noqa: F401  (before timm and torchvision)
from alldetect.data.index import index_folder
from alldetect.data.split import subject_folds, subject_key, subject_split
from alldetect.data.geometry import Preprocess
from alldetect.ensemble.combiners import COMBINERS
from alldetect.evaluation.evaluate import subject_level
from alldetect.evaluation.metrics import UndefinedMetricWarning, classification_metrics
from alldetect.formats.manifest import ManifestRow, read_manifest, write_manifest
from alldetect.formats.tables import format_table
from alldetect.models import Member, create_member
from alldetect.models.members import LITE_MEMBERS
from alldetect.models.runtime import resolve_device, score_members
from alldetect.training import TrainConfig, fit, profile_config
from alldetect.training.run_dir import RunDir
from alldetect.training.config import LOCATION, MACHINERY
from alldetect.training.split_images import load_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc-dev" / "fold_1"
REPORTED = ("auc", "ba", "wfs", "sensitivity", "specificity")
logger = logging.getLogger("cross_subject")


@dataclass(frozen=True)
class Recipe:
    name: str
    profile: str
    overrides: dict

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """``plus`` or ``plus-e12=plus:epochs=12,lr=1e-4``."""
        name, _, spec = text.partition("=")
        profile, _, assignments = (spec or name).partition(":")
        types = {f.name: f.type for f in fields(TrainConfig)}
        overrides = {}
        for item in filter(None, assignments.split(",")):
            key, _, value = item.partition("=")
            if key not in types:
                raise SystemExit(f"recipe {text!r}: unknown field {key!r}")
            overrides[key] = _parse_value(value, types[key])
        return cls(name, profile, overrides)


def _parse_value(value: str, annotation: str) -> object:
    if "bool" in annotation:
        return value.lower() in ("1", "true", "yes")
    if "int" in annotation and "float" not in annotation:
        return int(value)
    if "float" in annotation:
        return float(value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="C-NMC tree or folder with all/ and hem/")
    parser.add_argument("--out", type=Path, default=Path("runs/cross_subject"))
    parser.add_argument("--recipe", action="append", help="repeatable; default: paper and plus")
    parser.add_argument("--members", default=",".join(LITE_MEMBERS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--crop", type=int, default=300)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, help="every recipe's epochs, unless the recipe sets its own")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--val-fraction", type=float, default=0.25, help="of each class's training subjects")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                        help="random initialisation for every recipe and member")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds per member: 1 epoch at 32 px, for tests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("alldetect.training.loop").setLevel(logging.WARNING)
    if args.quick:
        args.epochs, args.input_size, args.batch_size = 1, 32, 8
    recipes = [Recipe.parse(r) for r in (args.recipe or ["paper", "plus"])]
    members = [m.strip() for m in args.members.split(",")]
    result = run(args, recipes, members)
    print(format_table(result["table"]))
    print(f"wall time {result['wall_s'] / 60:.1f} min; {result['subjects']} subjects in {args.folds} folds; "
          f"written {args.out / 'cross_subject.json'}")


def run(args: argparse.Namespace, recipes: list[Recipe], members: list[str]) -> dict:
    started = time.perf_counter()
    rows = [r for r in index_folder(args.data).rows if r.label]
    folds = subject_folds(rows, args.folds, seed=args.seed)
    pooled: dict[tuple[str, str, bool], dict[str, list]] = {}
    timings = {r.name: 0.0 for r in recipes}
    for fold in range(args.folds):
        fold_dir = args.out / f"fold{fold}"
        manifest = _fold_manifest(rows, folds, fold, fold_dir / "manifest.csv", args)
        for recipe in recipes:
            t0 = time.perf_counter()
            runs = [_train(recipe, member, manifest, fold_dir / recipe.name / member, args) for member in members]
            scored = _score_fold(runs, manifest, args)
            timings[recipe.name] += time.perf_counter() - t0
            for (model, tta), (y, prob, subjects) in scored.items():
                entry = pooled.setdefault((recipe.name, model, tta), {"y": [], "prob": [], "subject": []})
                entry["y"] += y.tolist()
                entry["prob"] += prob.tolist()
                entry["subject"] += subjects
    table = [_summary(name, model, tta, entry) for (name, model, tta), entry in pooled.items()]
    result = {"data": str(args.data), "subjects": len(folds), "folds": {s: int(f) for s, f in folds.items()},
              "recipes": {r.name: {"profile": r.profile, "overrides": r.overrides} for r in recipes},
              "members": members, "crop": args.crop, "input_size": args.input_size, "epochs": args.epochs,
              "machine": platform.platform(), "recipe_wall_s": timings, "wall_s": time.perf_counter() - started,
              "table": table,
              "predictions": {f"{n}|{m}|{'tta' if t else 'plain'}": e for (n, m, t), e in pooled.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_subject.json").write_text(json.dumps(result, indent=1))
    return result


def _fold_manifest(rows: list[ManifestRow], folds: dict[str, int], fold: int, path: Path,
                   args: argparse.Namespace) -> Path:
    """The fold's subjects are test; the others split by subject into train and validation."""
    held_out = [r.with_split("test") for r in rows if folds[subject_key(r)] == fold]
    pool = subject_split([r for r in rows if folds[subject_key(r)] != fold], val_fraction=args.val_fraction,
                         test_fraction=0.0, seed=args.seed + fold, every_class=True)
    for name in ("train", "val"):
        classes = {r.label for r in pool if r.split == name}
        if classes != {"all", "hem"}:
            raise SystemExit(f"fold {fold}: the {name} split holds {sorted(classes)} only; use fewer folds or "
                             "data with more subjects of each class")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(pool + held_out, path)
    return path


def _train(recipe: Recipe, member: str, manifest: Path, out: Path, args: argparse.Namespace) -> Path:
    common = dict(member=member, manifest=str(manifest), out=str(out), crop=args.crop, input_size=args.input_size,
                  epochs=args.epochs, batch_size=args.batch_size, pretrained=args.pretrained, seed=args.seed,
                  device=args.device, cache_dir=str(args.out / ".cache"))
    cfg = profile_config(recipe.profile, **{**common, **recipe.overrides})
    if (out / "config.json").is_file():
        saved, wanted = json.loads((out / "config.json").read_text())["config"], json.loads(json.dumps(asdict(cfg)))
        shaping = set(saved) - MACHINERY - LOCATION
        if any(saved[k] != wanted[k] for k in shaping if k in wanted):  # fields added later keep their defaults
            logger.info("%s: trained with another config; training again", out)
            shutil.rmtree(out)
        elif (out / "metrics.json").is_file():
            return out  # finished with this very config
    logger.info("training %s %s (%s)", recipe.name, member, out)
    return fit(cfg, resume=(out / "checkpoints" / "last.pt").is_file())


def _score_fold(runs: list[Path], manifest: Path, args: argparse.Namespace) -> dict:
    """Test-split P(ALL) of each member and each combiner (fitted on validation), with and without TTA."""
    rows = read_manifest(manifest)
    split = {name: load_split(rows, name, Preprocess(args.crop, args.input_size), cache_dir=args.out / ".cache")
             for name in ("val", "test")}
    device = resolve_device(args.device)
    members = [_load_member(run, device) for run in runs]
    y_val, y_test = split["val"].labels, split["test"].labels
    subjects = [r.subject for r in split["test"].rows]
    crops = {name: np.asarray(s.images[s.positions]) for name, s in split.items()}
    scored = {}
    for tta in (False, True):
        probs = {name: score_members(members, c, device=device, precision="fp32", tta=tta)
                 for name, c in crops.items()}
        for k, member in enumerate(m.name for m in members):
            scored[(member, tta)] = (y_test, probs["test"][k], subjects)
        if len(runs) > 1:
            for method, combiner in COMBINERS.items():
                combiner = combiner.fit(y_val, probs["val"])
                scored[(method, tta)] = (y_test, combiner.apply(probs["test"]), subjects)
    return scored


def _load_member(run: Path, device: torch.device) -> Member:
    state = RunDir(run, writes=False).best_state()
    member = create_member(state["member"])
    member.load_state_dict(state["model"])
    return member.to(device).eval()


def _summary(recipe: str, model: str, tta: bool, entry: dict) -> dict:
    y, prob = np.asarray(entry["y"]), np.asarray(entry["prob"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        metrics = classification_metrics(y, prob)
    subjects = subject_level(y, prob, entry["subject"])
    right = sum(s["correct"] == "yes" for s in subjects)
    return {"recipe": recipe, "model": model, "tta": "yes" if tta else "no",
            **{k: float(metrics[k]) for k in REPORTED}, "subjects_right": f"{right}/{len(subjects)}"}


if __name__ == "__main__":
    main()
