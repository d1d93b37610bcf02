"""Taking an ensemble to a new batch, measured on the leave-one-batch-out yardstick without training again.

Every ensemble that ``leave_one_batch_out.py`` trained (``--lobo``, its ``--out``) is taken to each batch it held
out, each batch on its own (a turn that held out fold_0+fold_2+test_prelim is taken to each of the three):

- **as shipped**: the held-out cells as the yardstick scored them, at the ensemble's fitted point;
- **adapted** (``alldetect adapt``, through ``Ensemble.adapt(...).save(...)``): every BatchNorm layer, the early
  ones only, and a half-and-half mix of training and site statistics, each adapted on all of the batch's cells
  (no labels), saved as a folder, loaded again and scored as a user would; a batch with fewer cells than
  ``adapt`` accepts stays as shipped, and the row says so;
- **calibrated** on k ALL + k healthy donors of the batch (``ensemble.calibrate.calibrate_point``, the function
  ``Ensemble.calibrate`` calls once it has scored the cells; the scores are the rows above), scored on the batch's
  other donors, over ``--draws`` draws of the calibration donors; a batch without k + 1 donors of each class stays
  as shipped;
- **adapted and calibrated**: the same draws on the scores of the adapted ensemble (``--calibrate-on``);
- **label shift**: adapted on the batch's ALL cells alone, scored on all of them.

Per batch and pooled over every scored donor: cell AUC, BA, sensitivity and specificity at each ensemble's point,
donors right and donor AUC, each with a 95% interval from a bootstrap over donors (for calibrated rows a donor
carries its cells of every draw). Writes ``<out>/site_adaptation.json``; adapted folders are kept under
``<out>`` and reused.

    python benchmarks/site_adaptation.py --lobo runs/lobo/full --out runs/site
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import alldetect
from alldetect.ensemble.adapt import MIN_CELLS
from alldetect.ensemble.calibrate import PRIOR_DONORS, calibrate_point
from alldetect.evaluation.evaluate import percentile_ci, subject_bootstrap
from alldetect.evaluation.operating_point import donor_means
from alldetect.formats.operating_point import OperatingPoint
from alldetect.formats.tables import format_table
from leave_one_batch_out import SHARED, _batches

ADAPTATIONS = {"all": dict(layers="all", site_weight=1.0), "early": dict(layers="early", site_weight=1.0),
               "mix": dict(layers="all", site_weight=0.5)}
logger = logging.getLogger("site_adaptation")


@dataclass
class Scored:
    """Cells of one row: each called at its own point, each donor (``unit``: donor, or donor and draw) by its
    own patient rule; ``donor`` is the bootstrap's cluster."""
    y: list = field(default_factory=list)
    prob: list = field(default_factory=list)
    called: list = field(default_factory=list)
    unit: list = field(default_factory=list)
    donor: list = field(default_factory=list)
    unit_called: dict = field(default_factory=dict)

    def add(self, y, prob, units, donors, point: OperatingPoint) -> None:
        self.y += list(y)
        self.prob += list(prob)
        self.called += list(point.cells_all(np.asarray(prob)))
        self.unit += list(units)
        self.donor += list(donors)
        for u in set(units):
            self.unit_called[u] = point.patient_all(float(np.mean(np.asarray(prob)[np.asarray(units) == u])))

    def extend(self, other: Scored) -> None:
        for name in ("y", "prob", "called", "unit", "donor"):
            getattr(self, name).extend(getattr(other, name))
        self.unit_called.update(other.unit_called)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lobo", type=Path, default=Path("runs/leave_one_batch_out"),
                        help="leave_one_batch_out.py's --out")
    parser.add_argument("--recipe", default="baseline")
    parser.add_argument("--out", type=Path, default=Path("runs/site_adaptation"))
    parser.add_argument("--data", type=Path, action="append")
    parser.add_argument("--adapt", action="append", choices=list(ADAPTATIONS), help="[default: all three]")
    parser.add_argument("--calibrate-on", default="all", choices=list(ADAPTATIONS),
                        help="the adaptation calibrated on, and adapted on ALL cells alone for the label shift")
    parser.add_argument("--donors", type=int, action="append", help="k of k+k calibration donors [default: 1, 2, 3]")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--prior-donors", type=float, action="append",
                        help=f"calibrate's prior, repeatable [default: {PRIOR_DONORS:g}]")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for quiet in ("alldetect.ensemble.build", "alldetect.data.index"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    result = measure(args)
    print(format_table(result["table"], markdown=True))
    print("\nthe calibrated cell threshold over the draws of calibration donors:")
    print(format_table(result["spread"], markdown=True))
    for name, lines in result["notes"].items():
        print(f"{name}: {'; '.join(sorted(set(lines)))}")
    print(f"\nwall time {result['wall_s'] / 60:.1f} min on {result['machine']}; adapting took "
          f"{', '.join(f'{k} {v:.1f} s' for k, v in result['adapt_seconds'].items())}; written "
          f"{args.out / 'site_adaptation.json'}")


def measure(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    batches = _batches(args.data or [SHARED / "cnmc-dev", SHARED / "cnmc-xfold"])
    lobo = json.loads((args.lobo / "leave_one_batch_out.json").read_text())
    adaptations = args.adapt or list(ADAPTATIONS)
    priors = args.prior_donors or [PRIOR_DONORS]
    ks = args.donors or [1, 2, 3]
    rows: dict[str, dict[str, Scored]] = {}
    notes: dict[str, list[str]] = {}
    adapt_seconds: dict[str, float] = {}
    thresholds: dict[str, list[float]] = {}  # row | batch -> the shipped cell threshold, then each draw's

    def row(name: str, batch: str, scored: Scored, note: str | None = None) -> None:
        rows.setdefault(name, {})[batch] = scored
        if note:
            notes.setdefault(name, []).append(note)

    for turn in lobo["held_out"]:
        shipped = alldetect.load(args.lobo / args.recipe / f"without-{turn}" / "run" / "ensemble", engine="torch")
        point = shipped.operating_point
        prob_of = dict(zip(*(lobo["scored"][f"{args.recipe}|{turn}"][k] for k in ("paths", "prob"))))
        for batch in turn.split("+"):
            cells = [r for r in batches[batch] if r.path in prob_of]
            paths, y = [r.path for r in cells], np.array([r.y for r in cells])
            donors = [f"{batch}:{r.subject}" for r in cells]
            as_shipped = np.array([prob_of[p] for p in paths])
            row("as shipped", batch, _scored(y, as_shipped, donors, point))
            adapted_probs = {}
            for name in adaptations:
                settings = ADAPTATIONS[name]
                folder = args.out / turn / batch / name
                if len(cells) < MIN_CELLS:
                    adapted_probs[name] = (as_shipped, point)
                    row(f"adapted ({name})", batch, _scored(y, as_shipped, donors, point),
                        f"{batch}: {len(cells)} cells, fewer than adapt's {MIN_CELLS}: as shipped")
                    continue
                began = time.perf_counter()
                if not (folder / "ensemble.json").is_file():
                    shipped.adapt(paths, subjects=[r.subject for r in cells], **settings).save(folder)
                adapt_seconds[f"{batch} {name}"] = time.perf_counter() - began
                ensemble = alldetect.load(folder, engine="torch")
                prob = _scores(ensemble, folder, paths)
                adapted_probs[name] = (prob, ensemble.operating_point)
                row(f"adapted ({name})", batch, _scored(y, prob, donors, ensemble.operating_point))
            if (y == 1).sum() >= MIN_CELLS and (y == 0).any():
                folder = args.out / turn / batch / f"{args.calibrate_on}-on-ALL-only"
                if not (folder / "ensemble.json").is_file():
                    all_only = [r for r in cells if r.y == 1]
                    shipped.adapt([r.path for r in all_only], subjects=[r.subject for r in all_only],
                                  **ADAPTATIONS[args.calibrate_on]).save(folder)
                ensemble = alldetect.load(folder, engine="torch")
                prob = _scores(ensemble, folder, paths)
                row(f"label shift: adapted ({args.calibrate_on}) on ALL cells alone", batch,
                    _scored(y, prob, donors, ensemble.operating_point))
            for k in ks:
                for prior in priors:
                    for start, (prob, base) in (("", (as_shipped, point)),
                                                ("adapted + ", adapted_probs.get(args.calibrate_on))):
                        if base is None:
                            continue
                        name = f"{start}calibrated {k}+{k}" + (f" (prior {prior:g})" if len(priors) > 1 else "")
                        draws = np.random.default_rng([args.seed, k, sorted(batches).index(batch)])  # same donors
                        spread = thresholds.setdefault(f"{name} | {batch}", [])
                        scored, note = _calibrated(y, prob, donors, base, k, prior, args.draws, draws, spread)
                        if spread:
                            spread.insert(0, base.cell_threshold)
                        row(name, batch, scored, note)
    table = []
    for name, by_batch in rows.items():
        pooled = Scored()
        for batch, scored in by_batch.items():
            table.append(_row(name, batch, scored, args))
            pooled.extend(scored)
        table.append(_row(name, "**pooled**", pooled, args))
    result = {"lobo": str(args.lobo), "recipe": args.recipe, "turns": lobo["held_out"], "machine": platform.platform(),
              "adaptations": {k: ADAPTATIONS[k] for k in adaptations}, "draws": args.draws, "priors": priors,
              "notes": notes, "adapt_seconds": adapt_seconds, "wall_s": time.perf_counter() - started, "table": table,
              "thresholds": thresholds, "spread": _spread(thresholds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "site_adaptation.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _spread(thresholds: dict[str, list[float]]) -> list[dict]:
    """How far the calibrated cell threshold moves between draws of the calibration donors."""
    rows = []
    for key, values in thresholds.items():
        if not values:
            continue
        (shipped, *drawn), (name, batch) = values, key.split(" | ")
        rows.append({"row": name, "batch": batch, "shipped": f"{shipped:.3f}", "draws": len(drawn),
                     "mean": f"{np.mean(drawn):.3f}", "SD": f"{np.std(drawn):.3f}",
                     "5-95%": f"{np.percentile(drawn, 5):.3f}-{np.percentile(drawn, 95):.3f}"})
    return rows


def _scores(ensemble: alldetect.Ensemble, folder: Path, paths: list[str]) -> np.ndarray:
    """The adapted ensemble's P(ALL) of ``paths``, kept beside its folder (keyed by its model id) for reruns."""
    kept = folder.with_name(f"{folder.name}.scores.json")
    if kept.is_file():
        saved = json.loads(kept.read_text())
        if saved["model_id"] == ensemble.folder.model_id and saved["paths"] == paths:
            return np.asarray(saved["prob"])
    prob = np.asarray(ensemble.predict(paths, domain_check=False)["prob_all"])
    kept.write_text(json.dumps({"model_id": ensemble.folder.model_id, "paths": paths, "prob": prob.tolist()}))
    return prob


def _scored(y: np.ndarray, prob: np.ndarray, donors: list[str], point: OperatingPoint) -> Scored:
    scored = Scored()
    scored.add(y, prob, donors, donors, point)
    return scored


def _calibrated(y: np.ndarray, prob: np.ndarray, donors: list[str], shipped: OperatingPoint, k: int, prior: float,
                draws: int, rng: np.random.Generator, thresholds: list[float]) -> tuple[Scored, str | None]:
    """The batch's other donors, called at the point calibrated on k + k drawn donors, over ``draws`` draws;
    as shipped (with a note) where the batch lacks k + 1 donors of a class."""
    names = np.asarray(donors)
    by_class = [sorted({d for d, t in zip(donors, y) if t == c}) for c in (1, 0)]
    if min(len(group) for group in by_class) < k + 1:
        counts = f"{len(by_class[0])} ALL, {len(by_class[1])} healthy donors"
        return _scored(y, prob, donors, shipped), f"{donors[0].split(':')[0]}: {counts}, too few for {k}+{k}: " \
                                                  "as shipped"
    scored = Scored()
    for draw in range(draws):
        chosen = {d for group in by_class for d in rng.choice(group, k, replace=False)}
        calibration = np.isin(names, list(chosen))
        point = calibrate_point(shipped, y[calibration], prob[calibration], list(names[calibration]),
                                prior_donors=prior, min_per_class=k)
        thresholds.append(point.cell_threshold)
        rest = ~calibration
        scored.add(y[rest], prob[rest], [f"{d}@{draw}" for d in names[rest]], list(names[rest]), point)
    return scored, None


def _figures(s: Scored, idx: np.ndarray) -> dict[str, float]:
    from alldetect.evaluation.metrics import classification_metrics

    y, prob, called = np.asarray(s.y)[idx], np.asarray(s.prob)[idx], np.asarray(s.called, dtype=float)[idx]
    units = [s.unit[i] for i in idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = classification_metrics(y, called, threshold=0.5)
        means, truth, _ = donor_means(y, prob, units)
        right = np.array([s.unit_called[u] == bool(t) for u, t in zip(sorted(set(units)), truth)])
        return {"auc": roc_auc_score(y, prob) if len(set(y.tolist())) == 2 else np.nan, "ba": cells["ba"],
                "sensitivity": cells["sensitivity"], "specificity": cells["specificity"],
                "donors_right": right.mean(), "all_right": right[truth == 1].mean() if (truth == 1).any() else np.nan,
                "hem_right": right[truth == 0].mean() if (truth == 0).any() else np.nan,
                "donor_auc": roc_auc_score(truth, means) if len(set(truth.tolist())) == 2 else np.nan,
                "units": len(truth), "units_all": int(truth.sum())}


def _row(name: str, batch: str, s: Scored, args: argparse.Namespace) -> dict:
    every = np.arange(len(s.y))
    m = _figures(s, every)
    y = np.asarray(s.y)

    def statistic(idx: np.ndarray, _drawn: list[str]) -> dict[str, float]:
        return _figures(s, idx)

    draws = subject_bootstrap(y, s.donor, statistic, n_boot=args.bootstrap, seed=args.seed)
    ci = percentile_ci(draws, ("auc", "ba", "sensitivity", "specificity", "donors_right", "donor_auc"))

    def value(key: str) -> str:
        lo, hi = ci[key]
        return f"{m[key]:.3f} ({lo:.2f}-{hi:.2f})" if np.isfinite(m[key]) else "-"

    n, n_all = m["units"], m["units_all"]
    truth = dict(zip(s.donor, s.y))
    return {"row": name, "batch": batch, "cells": len(y),
            "donors (ALL, healthy)": f"{len(truth)} ({sum(truth.values())}, {len(truth) - sum(truth.values())})",
            "cell AUC": value("auc"), "BA": value("ba"), "sensitivity": value("sensitivity"),
            "specificity": value("specificity"),
            "donors right (ALL, healthy)": f"{m['donors_right']:.3f} ({_count(m['all_right'], n_all)}, "
                                           f"{_count(m['hem_right'], n - n_all)})",
            "donor AUC": value("donor_auc")}


def _count(fraction: float, n: int) -> str:
    return f"{fraction * n:.0f}/{n}" if n and np.isfinite(fraction) else "-"


if __name__ == "__main__":
    main()
