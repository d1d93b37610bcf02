"""The paper's tables and figures for an ensemble directory: Table 4 (members and ensembles, with
subject-bootstrap CIs), Table 5 (confusion matrices), Fig. 5 (ROC), a reliability diagram, subject-level
results, and whether the best ensemble's gain over the best member is real."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from ..data.domain import measure_images
from ..ensemble.card import write_model_card
from ..ensemble.combiners import COMBINERS, combiner_label
from ..ensemble.folder import EnsembleFolder
from ..evaluation.evaluate import bootstrap_ci, paired_bootstrap, subject_level
from ..evaluation.metrics import UndefinedMetricWarning, classification_metrics, threshold_for_sensitivity
from ..formats.csvfiles import write_csv_atomic
from ..formats.labels import THRESHOLD
from ..formats.operating_point import PAPER_POINT
from ..formats.predictions import Predictions, read_predictions
from ..formats.tables import format_table

logger = logging.getLogger(__name__)
TABLE4_COLUMNS = ("wp", "wr", "wfs", "acc", "ba", "auc", "kappa")


def make_report(folder: EnsembleFolder | str | Path, *, n_boot: int = 1000, seed: int = 0,
                target_sensitivity: float = 0.95) -> Path:
    """Write ``report.md``, ``table4.csv``/``table4.json``, ``subjects.csv`` and PNG figures into the folder."""
    folder = EnsembleFolder.of(folder)
    ens_dir, spec = folder.path, folder.spec
    split = folder.report_split
    preds = read_predictions(folder.predictions(split))
    val = read_predictions(folder.predictions("val"))
    members = spec.names
    order = members + [m for m in COMBINERS if m in preds]
    first = next(iter(preds.values()))
    y, groups = first.y, np.array([s or p for s, p in zip(first.subject, first.path)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        point = {m: classification_metrics(y, preds[m].prob_all) for m in order}
        val_point = {m: classification_metrics(val[m].y, val[m].prob_all) for m in order}
        cis = {m: bootstrap_ci(y, preds[m].prob_all, groups, n_boot=n_boot, seed=seed) for m in order}
    best_member = max(members, key=lambda m: (val_point[m]["ba"], val_point[m]["auc"]))
    ensembles = [m for m in order if m not in members]
    best_ensemble = max(ensembles, key=lambda m: (val_point[m]["ba"], val_point[m]["auc"]))

    table4 = [{"model": combiner_label(m), "kind": "member" if m in members else "ensemble",
               **{k: point[m][k] for k in TABLE4_COLUMNS},
               **{f"{k}_ci": f"{cis[m][k][0]:.3f}-{cis[m][k][1]:.3f}" for k in TABLE4_COLUMNS}} for m in order]
    write_csv_atomic(ens_dir / "table4.csv", list(table4[0]), table4)
    gain = {metric: paired_bootstrap(y, preds[best_ensemble].prob_all, preds[best_member].prob_all, groups,
                                     metric=metric, n_boot=n_boot, seed=seed) for metric in ("ba", "auc", "wfs")}
    operating = _operating_point(val[spec.default_method], preds[spec.default_method], target_sensitivity)
    known = np.array([bool(s) for s in first.subject])  # images without a parsed subject have no patient
    subjects = {m: subject_level(y[known], preds[m].prob_all[known], [s for s in first.subject if s],
                                 point=spec.operating_point(m) if m in spec.methods else PAPER_POINT)
                for m in (best_member, spec.default_method)} if known.any() else {}
    fitted = _fitted_point(spec, y, preds[spec.default_method].prob_all, subjects.get(spec.default_method))
    if subjects:
        write_csv_atomic(ens_dir / "subjects.csv", ["model", *dict.fromkeys(k for rows in subjects.values()
                                                                            for k in rows[0])],
                         [{"model": combiner_label(m), **row} for m, rows in subjects.items() for row in rows])
    (ens_dir / folder.TABLE4).write_text(json.dumps(
        {"split": split, "data": spec.data, "tta": spec.tta, "metrics": point, "ci95": cis, "val_metrics": val_point,
         "best_member": best_member, "best_ensemble": best_ensemble, "gain": gain, "operating_point": operating,
         **({"fitted_point": fitted} if fitted else {})}, indent=2, default=float))

    _roc_figure(ens_dir / "roc.png", y, preds, order, members)
    _confusion_figure(ens_dir / "confusion.png", {m: point[m] for m in (best_member, best_ensemble)})
    _calibration_figure(ens_dir / "calibration.png", y, preds, members + [spec.default_method, best_ensemble])
    has_curves = training_curves_figure(ens_dir / "training.png", ens_dir, spec)
    report = _markdown(spec, split, table4, point, best_member, best_ensemble, gain, operating, subjects, fitted,
                       has_gradcam=(ens_dir / folder.GRADCAM / "gradcam_grid.png").is_file(), has_curves=has_curves)
    report += "\n" + "\n".join(_domain_section(folder, split, preds[spec.default_method]))
    (ens_dir / folder.REPORT).write_text(report)
    write_model_card(folder)
    return ens_dir / folder.REPORT


def _domain_section(folder: EnsembleFolder, split: str, preds: Predictions) -> list[str]:
    """The domain check on the report's cells: how many it flags, and the default method's figures on the cells
    inside beside those on all cells."""
    spec, reference = folder.spec, folder.domain()
    lines = ["## Domain check", ""]
    if reference is None:
        return lines + ["This ensemble has no domain reference (built by an earlier alldetect).", ""]
    lines += [f"The reference was fitted on {reference.fitted_on}; it flags {reference.flagged_out_of_fold:.1%} of "
              "those cells when each donor is checked against a reference fitted without it. The check is a guard, "
              "not a guarantee: a flagged cell is unlike the training cells, an unflagged one is not proven alike.",
              ""]
    measures, readable, _unreadable = measure_images(preds.path, reference.side)
    if not readable:
        return lines + [f"The {split} cells' images are not where the predictions name them, so they were not "
                        "checked here.", ""]
    idx, inside = np.array(readable), reference.check(measures).in_domain
    y, prob = preds.y[idx], preds.prob_all[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        every = classification_metrics(y, prob, threshold=spec.operating_point().cell_threshold)
        within = classification_metrics(y[inside], prob[inside], threshold=spec.operating_point().cell_threshold) \
            if inside.any() else None
    rows = [{"cells": f"all {len(idx)}", "coverage": f"{1:.1%}", **{k: every[k] for k in ("ba", "auc", "sensitivity",
                                                                                       "specificity")}}]
    if within is not None:
        rows.append({"cells": f"in domain {int(inside.sum())}", "coverage": f"{inside.mean():.1%}",
                     **{k: within[k] for k in ("ba", "auc", "sensitivity", "specificity")}})
    return lines + [f"On the {split} split the check flags {int((~inside).sum())} of {len(idx)} cells. "
                    f"{combiner_label(spec.default_method)} at the shipped operating point:", "",
                    format_table(rows, markdown=True), ""]


def _fitted_point(spec, y: np.ndarray, prob: np.ndarray, subjects: list[dict] | None) -> dict | None:
    """The default method's figures at its stored operating point, when one was fitted (not the paper's 0.5)."""
    point = spec.operating_point()
    if point.criterion == "paper":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        m = classification_metrics(y, prob, threshold=point.cell_threshold)
    labelled = [r for r in subjects or [] if r["truth"]]
    return {**point.to_json(), "ba": m["ba"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
            "subjects_right": sum(r["correct"] == "yes" for r in labelled), "subjects": len(labelled)}


def _operating_point(val: Predictions, test: Predictions, sensitivity: float) -> dict:
    """A threshold chosen on validation for the target sensitivity, and what it gives on test."""
    threshold = threshold_for_sensitivity(val.y, val.prob_all, sensitivity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        m = classification_metrics(test.y, test.prob_all, threshold=threshold)
    return {"target_sensitivity": sensitivity, "threshold": threshold, "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "fn": m["fn"], "fp": m["fp"]}


def _markdown(spec, split, table4, point, best_member, best_ensemble, gain, operating, subjects, fitted,
              has_gradcam: bool, has_curves: bool) -> str:
    data = spec.data
    scored = ("scored out of fold: each donor by the fold models that did not train on it" if spec.cross_fitted
              else f"scored on the {split} split")
    lines = [f"**Data: {data['dataset']}; split: {data['protocol']}; {scored}.**", "",
             "# alldetect report", ""]
    if data.get("synthetic"):
        lines += ["> Every number below was measured on synthetic cells. It shows that the pipeline works end to "
                  "end; it says nothing about leukemia detection on real smears.", ""]
    header = ["Classifier", "WP", "WR", "WFS", "ACC", "BA", "AUC", "kappa"]
    lines += ["## Table 4: members and ensembles", "",
              f"Cell level, ALL positive, threshold {THRESHOLD}; 95% CIs from a bootstrap over subjects."
              + (" Out-of-fold figures: every donor is scored by the fold models that did not train on it."
                 if spec.cross_fitted else ""), "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table4:
        cells = [f"{row[k]:.3f} ({row[k + '_ci']})" for k in TABLE4_COLUMNS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    fitted_on = ("Weights are fitted on these same out-of-fold predictions, so the ensembles' rows are slightly "
                 "optimistic." if spec.cross_fitted else "Weights are fitted on the validation split only.")
    lines += ["", f"{fitted_on} The best member and the best ensemble "
              f"are chosen by validation balanced accuracy: **{combiner_label(best_member)}** and "
              f"**{combiner_label(best_ensemble)}**.", "", "## Is the ensemble better?", ""]
    for metric, g in gain.items():
        verdict = "a real gain" if g["ci"][0] > 0 else "a loss" if g["ci"][1] < 0 else "not distinguishable"
        lines.append(f"- {metric.upper()}: {combiner_label(best_ensemble)} minus {combiner_label(best_member)} = "
                     f"{g['difference']:+.3f} (95% CI {g['ci'][0]:+.3f} to {g['ci'][1]:+.3f}, paired bootstrap "
                     f"over subjects, {g['resamples']} resamples): {verdict}.")
    lines += ["", "## Table 5: confusion matrices", "", "![confusion matrices](confusion.png)", ""]
    for m in (best_member, best_ensemble):
        c = point[m]
        hem, all_ = c["tn"] + c["fp"], c["fn"] + c["tp"]
        lines += [f"**{combiner_label(m)}**", "", "| actual \\ predicted | HEM | ALL |", "|---|---|---|",
                  f"| HEM | {c['tn']} ({_pct(c['tn'], hem)}) | {c['fp']} ({_pct(c['fp'], hem)}) |",
                  f"| ALL | {c['fn']} ({_pct(c['fn'], all_)}) | {c['tp']} ({_pct(c['tp'], all_)}) |", ""]
    lines += [*(["## Training curves", "", "Each member's training loss and learning rate per step, and its "
                 "validation metrics per epoch; the dotted line marks the epoch kept.", "",
                 "![training curves](training.png)", ""] if has_curves else []),
              "## ROC curves (Fig. 5)", "", "![ROC curves](roc.png)", "",
              "## Calibration", "", "![reliability diagram](calibration.png)", "",
              *(["## Grad-CAM (Figs. 6-8)", "", "Rows are cells; columns the members and the ensemble, whose map "
                 "is the weighted mean of the members' maps.", "", "![Grad-CAM grid](gradcam/gradcam_grid.png)", ""]
                if has_gradcam else []),
              "## Operating point for few false negatives", "",
              f"For {combiner_label(spec.default_method)}, the threshold that reaches sensitivity "
              f"{operating['target_sensitivity']:.2f} on validation is {operating['threshold']:.3f}; on {split} it "
              f"gives sensitivity {operating['sensitivity']:.3f} and specificity {operating['specificity']:.3f} "
              f"({operating['fn']} false negatives, {operating['fp']} false positives).", "",
              *(["## Shipped operating point", "",
                 f"{combiner_label(spec.default_method)}: {spec.operating_point().describe()}. On the {split} split "
                 "it gives "
                 f"BA {fitted['ba']:.3f}, sensitivity {fitted['sensitivity']:.3f} and specificity "
                 f"{fitted['specificity']:.3f}; {fitted['subjects_right']} of {fitted['subjects']} subjects are "
                 "called right." + (" The thresholds were fitted on these same out-of-fold predictions, so these "
                                    "figures are optimistic; judge them on donors of other batches." if
                                    spec.cross_fitted else ""), ""] if fitted else []),
              "## Subjects", "",
              f"Subjects are called by each model's operating point ({combiner_label(spec.default_method)}: "
              f"{spec.operating_point().describe()}; members: the paper's 0.5)." if fitted else
              f"A subject is called ALL when the mean P(ALL) of its cells is at least {THRESHOLD}." if subjects
              else "No subjects could be parsed from the file names, so there is no subject-level result.", ""]
    for m, rows in subjects.items():
        labelled = [r for r in rows if r["truth"]]
        right = sum(r["correct"] == "yes" for r in labelled)
        lines += [f"**{combiner_label(m)}**: {right} of {len(labelled)} subjects called right.", "",
                  format_table([{k: r[k] for k in ("subject", "cells", "flagged_all", "mean_prob_all", "call",
                                                   "truth", "correct")} for r in rows], markdown=True), ""]
    return "\n".join(lines)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.2f}%" if total else "-"


def training_curves_figure(path: Path, ens_dir: Path, spec) -> bool:
    """One row per member: loss and learning rate per step; validation loss, AUC and BA per epoch; the kept
    epoch marked. Returns False (and draws nothing) when no member has its training record."""
    records = [(m, _read_csv(ens_dir / m.record_dirs[0] / "history.csv"),  # a cross-fit: its first fold model
                _read_csv(ens_dir / m.record_dirs[0] / "epochs.csv"))
               for m in spec.members]
    records = [(m, h, e) for m, h, e in records if h and e]
    if not records:
        return False
    fig = Figure(figsize=(11, 2.8 * len(records)))
    axes = fig.subplots(len(records), 2, squeeze=False)
    for (member, history, epochs), (left, right) in zip(records, axes):
        steps = [int(r["step"]) for r in history]
        per_epoch = max(int(epochs[0]["step"]), 1)
        left.plot(steps, [float(r["loss"]) for r in history], lw=0.6, color="tab:blue", label="training loss")
        left.set(xlabel="optimizer step", ylabel="loss", title=f"{member.name}: training")
        lr_axis = left.twinx()
        lr_axis.plot(steps, [float(r["lr"]) for r in history], lw=1.0, color="tab:orange", label="learning rate")
        lr_axis.set_ylabel("learning rate", color="tab:orange")
        x = [int(r["epoch"]) for r in epochs]
        for key, colour in (("val_loss", "tab:blue"), ("auc", "tab:green"), ("ba", "tab:red")):
            right.plot(x, [float(r[key]) if r[key] not in ("", "nan") else np.nan for r in epochs], marker="o", ms=3,
                       color=colour, label={"val_loss": "val loss", "auc": "val AUC", "ba": "val BA"}[key])
        right.axhline(0.5, color="grey", lw=0.6, ls=":")
        if member.best_epoch is not None:
            right.axvline(member.best_epoch, color="black", lw=1.0, ls=":", label=f"kept: epoch {member.best_epoch}")
            left.axvline((member.best_epoch + 1) * per_epoch, color="black", lw=1.0, ls=":")
        right.set(xlabel="epoch", title=f"{member.name}: validation")
        right.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _roc_figure(path: Path, y: np.ndarray, preds: dict[str, Predictions], order: list[str], members: list[str]) -> None:
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20"].colors
    for i, m in enumerate(order if len(set(y.tolist())) == 2 else []):
        fpr, tpr, _ = roc_curve(y, preds[m].prob_all)
        auc = classification_metrics(y, preds[m].prob_all)["auc"]
        ax.plot(fpr, tpr, lw=1.2 if m in members else 2.0, ls="--" if m in members else "-",
                color=colours[(2 * i) % 20 + (i * 2 >= 20)], label=f"{combiner_label(m)} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title="ROC: members (dashed) and ensembles", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _confusion_figure(path: Path, counts: dict[str, dict]) -> None:
    fig = Figure(figsize=(4.2 * len(counts), 3.8))
    axes = fig.subplots(1, len(counts))
    for ax, (m, c) in zip(np.atleast_1d(axes), counts.items()):
        matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]], dtype=float)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{int(matrix[i, j])}\n{100 * rates[i, j]:.2f}%", ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["HEM", "ALL"], yticklabels=["HEM", "ALL"],
               xlabel="predicted", ylabel="actual", title=combiner_label(m))
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _calibration_figure(path: Path, y: np.ndarray, preds: dict[str, Predictions], models: list[str]) -> None:
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfectly calibrated")
    for m in dict.fromkeys(models):
        frac, mean = calibration_curve(y, preds[m].prob_all, n_bins=10, strategy="quantile")
        ax.plot(mean, frac, marker="o", ms=3, label=combiner_label(m))
    ax.set(xlabel="mean predicted P(ALL)", ylabel="observed fraction ALL", title="Reliability diagram",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
