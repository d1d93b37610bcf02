"""Leave one batch out: the cross-batch yardstick over every labelled donor of ``cnmc-dev`` and ``cnmc-xfold``.

The C-NMC cells of these folders come from four batches (the challenge's fold_0, fold_1, fold_2 and preliminary
test set). For each batch in turn, `alldetect run --data` (its cross-fitting and fitted operating point
included) trains on the other three, and the ensemble it ships scores the held-out batch's donors at its own
operating point, as a user's would on a new batch. Reported per held-out batch and pooled over all donors: cell
AUC, balanced accuracy, sensitivity and specificity, donors called right (ALL, healthy) and donor AUC, each with
a 95% interval from a bootstrap over the donors.

    python benchmarks/leave_one_batch_out.py                                      # the CPU default of `run`
    python benchmarks/leave_one_batch_out.py --members efficientnet_lite0 --epochs 4 --out runs/lobo/cheap
    python benchmarks/leave_one_batch_out.py --recipe donors=sampling:donors ...   # a lever, beside the baseline

``--recipe NAME=field:value,...`` (repeatable) reruns the whole yardstick with `alldetect run` options changed
(``PipelineConfig`` fields); the baseline (no change) runs first unless ``--no-baseline`` (its figures measured
before, with the same options). ``--hold-out BATCH`` (repeatable) holds out only the batches named, and pools
over their donors; ``--hold-out A+B`` holds out two batches together and trains on the rest. Holding out fold_1
trains on the 173 cells of the other three batches, the cheapest way to try the full recipe; ``--hold-out fold_1
--hold-out fold_0+fold_2+test_prelim`` splits the donors by batch in two, every donor held out once. Finished
runs are reused. ``--operating-point CRITERION[:TARGET]`` (repeatable; ``sensitivity:0.9``,
``specificity:0.5``, ``balanced_accuracy``) adds rows with each ensemble's cell and patient thresholds refitted
by that criterion on its own out-of-fold predictions, as ``alldetect run --operating-point`` would fit them;
every criterion calls the same held-out scores, since a criterion changes no probability. Prints one table and writes
``<out>/leave_one_batch_out.json`` after every recipe, so an interrupted run keeps the recipes it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import alldetect
from alldetect.choices import FITTED_CRITERIA, Criterion
from alldetect.data.index import index_folder
from alldetect.errors import AlldetectError
from alldetect.evaluation.evaluate import donor_metrics, percentile_ci, subject_bootstrap
from alldetect.evaluation.metrics import classification_metrics
from alldetect.evaluation.operating_point import donor_means, fit_operating_point
from alldetect.formats.operating_point import OperatingPoint
from alldetect.formats.predictions import read_predictions
from alldetect.formats.tables import format_table
from alldetect.pipeline import PipelineConfig, run_pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH_OF_SOURCE = {"bmp": "fold_1"}  # cnmc-dev's original BMPs are cells of its fold_1 donors
logger = logging.getLogger("leave_one_batch_out")


@dataclass(frozen=True)
class Recipe:
    name: str
    options: dict  # PipelineConfig fields

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """``NAME=field:value,field:value`` (values read as int, float, or kept as text)."""
        name, _, spec = text.partition("=")
        options = {}
        for item in filter(None, spec.split(",")):
            field, _, value = item.partition(":")
            options[field] = _value(value)
        return cls(name, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, action="append", help="labelled C-NMC folders [default: cnmc-dev and "
                                                                    "cnmc-xfold]")
    parser.add_argument("--out", type=Path, default=Path("runs/leave_one_batch_out"))
    parser.add_argument("--members", help="comma-separated [default: `alldetect run`'s choice]")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--folds", type=int)
    parser.add_argument("--recipe", action="append", default=[], help="a lever, repeatable (see above)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="only the --recipe levers")
    parser.add_argument("--hold-out", action="append", metavar="BATCH[+BATCH]", help="batches to hold out "
                                                                                     "together, repeatable "
                                                                                     "[default: each in turn]")
    parser.add_argument("--operating-point", action="append", default=[], metavar="CRITERION[:TARGET]",
                        help="also report each ensemble at thresholds refitted by this criterion, repeatable "
                             "(see above)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for quiet in ("alldetect.training.loop", "alldetect.ensemble.build", "alldetect.pipeline",
                  "alldetect.data.cache"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    try:
        result = measure(args)
    except AlldetectError as error:  # a bad --hold-out, or data that `alldetect run` refuses: one line
        parser.error(str(error))
    print(format_table(result["table"], markdown=True))
    turns = result["held_out"]
    print(f"\nwall time {result['wall_s'] / 60:.1f} min on {result['machine']}; {result['donors']} donors held out "
          f"in {len(turns)} turns ({', '.join(turns)}); written {args.out / 'leave_one_batch_out.json'}")


def measure(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    batches = _batches(args.data or [SHARED / "cnmc-dev", SHARED / "cnmc-xfold"])
    units = _held_out_units(args.hold_out, batches)
    levers = [Recipe.parse(text) for text in args.recipe]
    criteria = [_criterion(text) for text in args.operating_point]
    recipes = [Recipe("baseline", {}), *levers] if args.baseline else levers
    if not recipes:
        raise AlldetectError("--no-baseline without a --recipe: nothing to measure")
    table, scored, timing = [], {}, {}
    for recipe in recipes:
        variants = [recipe.name] + [f"{recipe.name} @ {criterion} {target or ''}".rstrip()
                                    for criterion, target in criteria]
        rows_of = {variant: [] for variant in variants}
        pooled = {variant: {"y": [], "prob": [], "called": [], "subjects": [], "patient_all": {}}
                  for variant in variants}
        for unit in units:
            began, held_out = time.perf_counter(), "+".join(unit)
            ensemble = _train_without(unit, batches, recipe, args)
            rows = [row for batch in unit for row in batches[batch]]
            cells = ensemble.predict([r.path for r in rows], domain_check=False)
            prob, kept = cells["prob_all"], np.isfinite(cells["prob_all"])
            prob, y = prob[kept], np.array([int(r.y) for r in rows])[kept]
            subjects = [r.subject for r, k in zip(rows, kept) if k]
            points = [ensemble.operating_point, *_refitted(ensemble, criteria)]
            for variant, point in zip(variants, points):
                rows_of[variant].append(_row(variant, held_out, y, prob, subjects, point, args))
                _pool(pooled[variant], y, prob, subjects, point)
            scored[f"{recipe.name}|{held_out}"] = {"paths": [r.path for r, k in zip(rows, kept) if k],
                                                   "prob": prob.tolist(), "point": points[0].to_json(),
                                                   "refitted": {v: p.to_json() for v, p in zip(variants[1:],
                                                                                               points[1:])}}
            timing[f"{recipe.name}|{held_out}"] = time.perf_counter() - began
        for variant in variants:
            table += rows_of[variant] + [_pooled_row(variant, pooled[variant], args)]
        result = {"batches": {b: len(rows) for b, rows in batches.items()}, "held_out": ["+".join(u) for u in units],
                  "donors": len({r.subject for unit in units for b in unit for r in batches[b]}),
                  "recipes": [r.__dict__ for r in recipes], "members": args.members, "epochs": args.epochs,
                  "input_size": args.input_size, "machine": platform.platform(), "seconds": timing,
                  "wall_s": time.perf_counter() - started, "table": table, "scored": scored}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "leave_one_batch_out.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _criterion(text: str) -> tuple[str, float | None]:
    """``CRITERION[:TARGET]`` as (criterion, target); sensitivity and specificity need a target in (0, 1]."""
    criterion, _, target = text.partition(":")
    if criterion not in FITTED_CRITERIA:
        raise AlldetectError(f"--operating-point {text}: the criterion is one of {', '.join(FITTED_CRITERIA)}")
    if criterion == Criterion.balanced_accuracy:
        if target:
            raise AlldetectError(f"--operating-point {text}: balanced_accuracy takes no target")
        return criterion, None
    try:
        value = float(target)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise AlldetectError(f"--operating-point {text}: {criterion} needs a target in (0, 1], as {criterion}:0.9")
    return criterion, value


def _refitted(ensemble: alldetect.Ensemble, criteria: list[tuple[str, float | None]]) -> list[OperatingPoint]:
    """The ensemble's operating point fitted anew by each criterion on the out-of-fold predictions its own was
    fitted on (those of the combiner it scores with)."""
    if not criteria:
        return []
    val = read_predictions(ensemble.folder.predictions("val"))[ensemble.method]
    return [fit_operating_point(val.y, val.prob_all, val.subject, criterion=criterion, target=target,
                                fitted_on=ensemble.operating_point.fitted_on) for criterion, target in criteria]


def _pool(pooled: dict, y: np.ndarray, prob: np.ndarray, subjects: list[str], point: OperatingPoint) -> None:
    """One held-out unit's cells, called at its ensemble's ``point``, added to the pooled figures."""
    pooled["y"].append(y)
    pooled["prob"].append(prob)
    pooled["called"].append(point.cells_all(prob))
    pooled["subjects"] += subjects
    pooled["patient_all"].update({s: point.patient_all(float(np.mean(prob[np.asarray(subjects) == s])))
                                  for s in set(subjects)})


def _batches(folders: list[Path]) -> dict[str, list]:
    """The labelled cells of ``folders`` by batch (the challenge folder each came from)."""
    batches: dict[str, list] = {}
    for folder in folders:
        for row in index_folder(folder).rows:
            if row.label:
                batches.setdefault(BATCH_OF_SOURCE.get(row.source, row.source), []).append(row)
    return dict(sorted(batches.items()))


def _held_out_units(texts: list[str] | None, batches: dict[str, list]) -> list[tuple[str, ...]]:
    """The batches held out together, one tuple per trained ensemble: each batch alone unless ``texts``
    (``A`` or ``A+B``) names them; a batch named twice would pool its donors twice, so it is refused."""
    if not texts:
        return [(batch,) for batch in batches]
    units = [tuple(text.split("+")) for text in texts]
    named = [batch for unit in units for batch in unit]
    unknown = sorted(set(named) - set(batches))
    if unknown:
        raise AlldetectError(f"--hold-out {', '.join(unknown)}: no such batch; the data has {', '.join(batches)}")
    twice = sorted({batch for batch in named if named.count(batch) > 1})
    if twice:
        raise AlldetectError(f"--hold-out names {', '.join(twice)} more than once; each batch is held out at most once")
    return units


def _train_without(held_out: tuple[str, ...], batches: dict[str, list], recipe: Recipe,
                   args: argparse.Namespace) -> alldetect.Ensemble:
    """`alldetect run --data` on a folder of links to every other batch's cells; its ensemble, loaded."""
    out = args.out / recipe.name / f"without-{'+'.join(held_out)}"
    data = out / "data"
    for batch, rows in batches.items():
        if batch in held_out:
            continue
        for k, row in enumerate(rows):  # named as C-NMC names cells: the subject travels without a label file
            link = data / batch / row.label / f"UID_{row.subject}_{k}_1_{row.label}{Path(row.path).suffix}"
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(row.path).resolve())
    options = dict(members=tuple(args.members.split(",")) if args.members else None, epochs=args.epochs,
                   input_size=args.input_size, folds=args.folds, pretrained=args.pretrained, device=args.device,
                   seed=args.seed, bootstrap=100, report=False)  # the yardstick reads only the ensemble
    options.update(recipe.options)
    run_pipeline(PipelineConfig(out=str(out / "run"), data=str(data), **options))
    return alldetect.load(out / "run" / "ensemble", engine="torch", device=args.device)


def _row(recipe: str, batch: str, y: np.ndarray, prob: np.ndarray, subjects: list[str], point,
         args: argparse.Namespace) -> dict:
    m = donor_metrics(y, prob, subjects, point=point)
    draws = subject_bootstrap(y, subjects, lambda idx, drawn: donor_metrics(y[idx], prob[idx], drawn, point=point),
                              n_boot=args.bootstrap, seed=args.seed)
    ci = percentile_ci(draws, tuple(m))
    return _formatted(recipe, batch, y, subjects, m, ci, f"{point.cell_threshold:.3f}")


def _pooled_row(recipe: str, pooled: dict, args: argparse.Namespace) -> dict:
    """Every held-out batch's cells together, each called at its own ensemble's point."""
    y, prob = np.concatenate(pooled["y"]), np.concatenate(pooled["prob"])
    called, subjects = np.concatenate(pooled["called"]).astype(float), pooled["subjects"]
    patient_all = pooled["patient_all"]

    def figures(idx: np.ndarray, names: list[str]) -> dict[str, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cells = classification_metrics(y[idx], called[idx], threshold=0.5)
            means, truth, _ = donor_means(y[idx], prob[idx], names)
            original = [subjects[i] for i in idx]
            donors = {n: (o, int(t)) for n, o, t in zip(names, original, y[idx])}
            right = np.array([patient_all[o] == bool(t) for o, t in donors.values()])
            is_all = np.array([t for _, t in donors.values()], dtype=bool)
            return {"auc": roc_auc_score(y[idx], prob[idx]), "ba": cells["ba"], "sensitivity": cells["sensitivity"],
                    "specificity": cells["specificity"], "subjects_right": right.mean(),
                    "all_right": right[is_all].mean() if is_all.any() else np.nan,
                    "hem_right": right[~is_all].mean() if (~is_all).any() else np.nan,
                    "subject_auc": roc_auc_score(truth, means) if len(set(truth.tolist())) == 2 else np.nan}

    every = np.arange(len(y))
    m = figures(every, subjects)
    draws = subject_bootstrap(y, subjects, figures, n_boot=args.bootstrap, seed=args.seed)
    ci = percentile_ci(draws, tuple(m))
    return _formatted(recipe, "**pooled**", y, subjects, m, ci, "each its own")


def _formatted(recipe: str, batch: str, y: np.ndarray, subjects: list[str], m: dict, ci: dict,
               threshold: str) -> dict:
    donors = {s: int(y[np.asarray(subjects) == s].max()) for s in set(subjects)}
    n_all, n_hem = sum(donors.values()), len(donors) - sum(donors.values())

    def interval(key: str) -> str:
        lo, hi = ci[key]
        return f"({lo:.2f}-{hi:.2f})"

    def count(key: str, n: int) -> str:
        return f"{round(m[key] * n)}/{n}" if n and np.isfinite(m[key]) else "-"

    return {"recipe": recipe, "held out": batch, "cells": len(y), "donors (ALL, healthy)": f"{len(donors)} "
            f"({n_all}, {n_hem})", "threshold": threshold, "cell AUC": f"{m['auc']:.3f} {interval('auc')}",
            "BA": f"{m['ba']:.3f} {interval('ba')}", "sensitivity": f"{m['sensitivity']:.3f} {interval('sensitivity')}",
            "specificity": f"{m['specificity']:.3f} {interval('specificity')}",
            "donors right (ALL, healthy)": f"{count('subjects_right', len(donors))} ({count('all_right', n_all)}, "
                                           f"{count('hem_right', n_hem)})",
            "donor AUC": f"{m['subject_auc']:.3f} {interval('subject_auc')}"}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
