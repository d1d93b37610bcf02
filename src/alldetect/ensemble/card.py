"""``MODEL_CARD.md`` of an ensemble folder, in the sections people know from model hubs. Written when the
ensemble is built and again by the report, whose validation and test figures (with subject-bootstrap CIs) it
then quotes."""

from __future__ import annotations

import json
from pathlib import Path

from ..choices import Colour
from ..data.transforms import STAINED
from ..formats.labels import THRESHOLD
from ..formats.tables import format_table
from .folder import EnsembleFolder
from .spec import EnsembleSpec

CARD_METRICS = ("auc", "ba", "wfs", "sensitivity", "specificity")
SECTIONS = ("What it does and for whom", "Not a medical device", "Training data", "Adapted to a site", "Preprocessing",
            "Members and ensemble", "Results", "Domain check", "Limitations", "How to use it", "Versions")
CNMC_CITATION = ("Gupta A., Gupta R. (2019). ALL Challenge dataset of ISBI 2019 [Data set]. The Cancer Imaging "
                 "Archive. https://doi.org/10.7937/tcia.2019.dc64i46r (licence: CC BY 3.0)")


def write_model_card(folder: EnsembleFolder | str | Path) -> Path:
    folder = EnsembleFolder.of(folder)
    spec, name = folder.spec, folder.path.name
    table4 = folder.path / folder.TABLE4
    results = json.loads(table4.read_text()) if table4.is_file() else None
    sections = {
        "What it does and for whom": _purpose(spec),
        "Not a medical device": [
            "Research software. It has not been cleared or approved by any regulator and must not be used to "
            "diagnose, treat or triage anyone. A flagged cell is a prompt for an expert to look, nothing more."],
        "Training data": _data(spec),
        "Adapted to a site": _site(spec),
        "Preprocessing": _preprocessing(spec),
        "Members and ensemble": _members(spec),
        "Results": _results(spec, results),
        "Domain check": _domain(folder),
        "Limitations": [
            _batch_shift(spec),
            "- One segmented cell per image, centred on a black background, as in C-NMC-2019: whole smears or "
            "other segmentations are outside what it was trained on.",
            _balance(spec),
            "- Cells of one subject are not independent: judge results by subjects, not by cell counts."],
        "How to use it": [
            "Copy this folder: it holds everything needed (member weights as safetensors, preprocessing, fitted "
            "combiners, ONNX graphs when exported). Then:", "",
            "```bash",
            f"alldetect predict {name} CELLS_OR_FOLDERS -o predictions.csv   # CSV + patient summary",
            f"alldetect explain {name} CELL.png -o gradcam                   # Grad-CAM of each member",
            f"alldetect export {name}                                        # fast CPU engine (ONNX, int8)",
            f"alldetect serve {name}                                         # web page for the lab",
            "```"],
        "Versions": [f"- {k}: {v}" for k, v in spec.versions.items()] + [f"- model id: {folder.model_id}"],
    }
    lines = [f"# Model card: alldetect ensemble {folder.model_id}", ""]
    if spec.data.get("synthetic"):
        lines += ["> **Trained on SYNTHETIC cells.** This model shows that the software works; it detects nothing "
                  "in real blood.", ""]
    for title in SECTIONS:
        lines += [f"## {title}", "", *sections[title], ""]
    path = folder.path / folder.CARD
    path.write_text("\n".join(lines))
    return path


def _batch_shift(spec: EnsembleSpec) -> str:
    """What is known of this model on donors of other batches: only what was measured, and for which model."""
    batches = spec.data.get("batches")
    trained = (f"This model was trained on cells of {len(batches)} batch{'es' if len(batches) > 1 else ''} "
               f"({', '.join(batches)})" if batches else "The batches this model was trained on are not recorded")
    return (f"- Stain and scanner shift: {trained}; how it scores donors of other batches, labs, stains or "
            "microscopes was not measured for this model. Cells from elsewhere score differently: in alldetect's "
            "own measurement of another model (BENCHMARKS.md, cross-batch), an ensemble trained on 14 donors of one "
            "C-NMC batch reached a cell AUC of 0.68 on 22 donors of three other batches and called most of their "
            "healthy cells ALL. Measure it on donors of your own batches before trusting its cell calls.")


def _purpose(spec: EnsembleSpec) -> list[str]:
    return [f"Estimates the probability that a single white-blood-cell image shows an acute lymphoblastic "
            f"leukemia blast (ALL) rather than a normal cell (HEM), with a weighted ensemble of {len(spec.members)} "
            f"convolutional networks ({', '.join(spec.names)}). Operating point: "
            f"{spec.operating_point().describe()}. For hematology and imaging researchers who want to study or "
            "benchmark such models, and for labs that want suspicious cells pointed out for review."]


def _balance(spec: EnsembleSpec) -> str:
    point = spec.operating_point()
    if point.criterion == "paper":
        return (f"- Class balance: C-NMC holds about two ALL cells per normal one and few healthy donors; the "
                f"{point.cell_threshold} threshold and the patient rule (mean P(ALL) >= {point.patient_threshold}) "
                "are not tuned for screening prevalence.")
    return (f"- Operating point: the thresholds ({point.cell_threshold:.3f} for a cell, {point.patient_threshold:.3f} "
            f"for a patient's mean) were fitted on {point.fitted_on or 'validation predictions'}; they carry the "
            "training donors' class balance and batches, not a lab's screening prevalence. Refit them for another "
            "aim with `alldetect ensemble --sensitivity` or `--specificity`.")


def _data(spec: EnsembleSpec) -> list[str]:
    data = spec.data
    lines = [f"- Dataset: {data.get('dataset', 'unknown')}" + (" (SYNTHETIC)" if data.get("synthetic") else ""),
             f"- Split: {data.get('protocol', 'unknown')}; "
             + ("no donor is scored by a fold model that trained on it." if spec.cross_fitted
                else "no subject is in two splits.")]
    if not data.get("synthetic"):
        lines.append(f"- C-NMC-2019: {CNMC_CITATION}")
    counts = data.get("counts")
    if counts:
        rows = [{"split": split, "ALL images": c["all"]["images"], "ALL subjects": c["all"]["subjects"],
                 "HEM images": c["hem"]["images"], "HEM subjects": c["hem"]["subjects"]}
                for split, c in counts.items()]
        lines += ["", format_table(rows, markdown=True)]
    return lines


def _site(spec: EnsembleSpec) -> list[str]:
    """Each adaptation and calibration of the folder, in order; nothing for a folder as trained."""
    lines = []
    for step in spec.site:
        donors = f"{step['donors']} donors" if step.get("donors") else "donors not named"
        origin = f"from ensemble {step.get('from', '?')} ({step.get('from_folder', '?')}) on {step.get('when', '?')}"
        if step.get("step") == "adapt":
            lines.append(f"- **Adapted** on {step['cells']} unlabelled cells of the site ({donors}), {origin}: the "
                         f"BatchNorm statistics of {step['layers']} layers re-estimated on them "
                         f"({step['adapted_layers']} layers), weighed {step['site_weight']:g} against the training ones. The domain check keeps "
                         "its training reference: it still flags cells unlike the training cells. The predictions, "
                         "report and figures in this folder are those of the ensemble before adaptation."
                         + _called_shares(step.get("called_all")) + _graphs(step.get("graphs")))
        elif step.get("step") == "calibrate":
            loo, (low, high) = step["leave_one_out"], step["cell_threshold_interval"]
            named = ", ".join(f"{d} ({'ALL' if c else 'healthy'})" for d, c in step["donors"].items())
            shipped, point, site = step["shipped"], step["point"], step["site_point"]
            lines.append(f"- **Calibrated** on {step['cells']} labelled cells of {len(step['donors'])} donors of "
                         f"the site ({named}), {origin}: cell threshold {shipped['cell_threshold']:.3f} -> "
                         f"{point['cell_threshold']:.3f} (the site alone: {site['cell_threshold']:.3f}; its donors "
                         f"weighed {step['site_weight']:.2f} against the shipped point, which counts as "
                         f"{step['prior_donors']:g} donors; 5-95% over donor bootstraps {low:.3f}-{high:.3f}), "
                         f"patient threshold {shipped['patient_threshold']:.3f} -> {point['patient_threshold']:.3f}, "
                         f"at least {point['min_cells']} cells for a call. Leaving one calibration donor out at a "
                         f"time: {loo['donors_right']} of {loo['donors']} donors right, their cells' sensitivity "
                         f"{loo['sensitivity']:.3f} and specificity {loo['specificity']:.3f}. So few donors pin the "
                         "point only roughly: check it on more of the site's donors as they come."
                         + _graphs(step.get("graphs")))
    return lines or ["None: this ensemble is as it was trained (`alldetect adapt` and `alldetect calibrate` write "
                     "a copy adapted to a site's batch or calibrated on its donors)."]


def _called_shares(shares: dict | None) -> str:
    if not shares:
        return ""
    return (f" Of a sample of the site's cells it called {shares['before']:.0%} ALL before adapting and "
            f"{shares['after']:.0%} after (a large move warns of a batch made mostly of one kind).")


def _graphs(graphs: str | None) -> str:
    return f" ONNX graphs: {graphs}." if graphs else ""


def _domain(folder: EnsembleFolder) -> list[str]:
    reference = folder.domain()
    if reference is None:
        return ["None: this folder was built before domain checks; rebuild it with `alldetect ensemble`."]
    return [f"Every cell scored is checked against what the training cells look like ({reference.fitted_on}): "
            "a black background around the cell (C-NMC's segmentation), its size, the colours of its stain, and "
            "all measures together. A cell unlike them is flagged `in_domain: no` with the reason, beside its "
            "P(ALL), which is kept; a patient with most cells flagged gets no call, and the web page shows such "
            "cells as outside what this model was trained on. The thresholds flag "
            f"{reference.flagged_out_of_fold:.1%} of the training donors' own cells (each checked against a "
            "reference fitted without its donor).",
            "",
            "It is a guard, not a guarantee: a flagged cell's probability should not be trusted, but an unflagged "
            "cell is not proven to be like the training cells; images of another lab, stain or microscope can "
            "pass the check and still score worse (see Limitations)."]


def _preprocessing(spec: EnsembleSpec) -> list[str]:
    pre = spec.preprocess
    size = f", resized to {pre.input_size}x{pre.input_size} (bilinear)" if pre.input_size else ""
    return [f"- Pixel-exact {pre.crop}x{pre.crop} center crop of the frame{size}; uint8 RGB in.",
            _colour(spec),
            "- Test-time augmentation: " + ("on: each member's P(ALL) is the mean over the eight flips and "
                                            "90-degree rotations (the combiners were fitted that way)."
                                            if spec.tta else "off (the paper's protocol).")]


def _colour(spec: EnsembleSpec) -> str:
    if spec.preprocess.colour == Colour.imagenet:
        return ("- Each member normalises inside the network with the mean/std its ImageNet weights expect: "
                + "; ".join(f"{m.name} {_triple(m.mean)}/{_triple(m.std)}" for m in spec.members) + ".")
    scale = ("divided by the ImageNet std of each member's weights" if spec.preprocess.colour == Colour.centre
             else "each channel divided by its own spread over those pixels")
    return (f"- Colour `{spec.preprocess.colour}`, inside each member: the cell's mean colour over its stained "
            f"pixels (brighter than {STAINED * 255:.0f}/255 in some channel) is subtracted, the black background "
            f"stays 0, {scale}.")


def _triple(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _members(spec: EnsembleSpec) -> list[str]:
    fit = spec.fit(spec.default_method)
    weights = fit.weights or [None] * len(spec.members)
    rows = []
    for member, weight in zip(spec.members, weights):
        config = member.provenance.get("config", {})
        val = spec.val_metrics.get(member.name, {})
        kept = "-" if member.best_epoch is None else member.best_epoch
        rows.append({"member": member.name, "weight": "-" if weight is None else f"{weight:.3f}",
                     "kept epoch": f"{kept}, {member.folds} fold models averaged" if member.folds > 1 else kept,
                     "selected by": config.get("select_metric", "-"),
                     "training": f"{config.get('optimizer', '?')}, {config.get('schedule', '?')}, "
                                 f"{config.get('epochs', '?')} epochs, "
                                 f"{'ImageNet' if config.get('pretrained') else 'random'} start",
                     "val AUC": val.get("auc", float("nan")), "val BA": val.get("ba", float("nan"))})
    fp32 = (spec.bf16 or {}).get("fp32_members") or []
    fitted_on = "the out-of-fold predictions of every donor" if spec.cross_fitted else "the validation split only"
    return [f"Default method: **{spec.default_method}** (weights fitted on {fitted_on}); the "
            f"folder also holds {', '.join(m for m in spec.methods if m != spec.default_method)}.", "",
            format_table(rows, markdown=True), "",
            f"Reduced precision: members that bf16 moves too far on validation cells run in fp32: "
            f"{', '.join(fp32) if fp32 else 'none'}."]


def _results(spec: EnsembleSpec, results: dict | None) -> list[str]:
    if results is None:
        return ["No report yet: `alldetect report` adds validation and test results here."]
    method = spec.default_method
    rows = []
    scored = (("out of fold (95% CI)" if spec.cross_fitted else f"{results['split']} (95% CI)"),
              results["metrics"].get(method), results["ci95"].get(method))
    for name, metrics, cis in ((("validation", results["val_metrics"].get(method), None), scored)
                               if results["split"] != "val" else (scored,)):
        if metrics is None:
            continue
        rows.append({"split": name, **{k: f"{metrics[k]:.3f}" + (f" ({cis[k][0]:.3f}-{cis[k][1]:.3f})" if cis
                                                                   else "") for k in CARD_METRICS}})
    scope = "the synthetic" if spec.data.get("synthetic") else "the"
    lines = [f"{method}, cell level, threshold {THRESHOLD} (the paper's Table 4), on {scope} splits above; 95% CIs "
             f"from a bootstrap over subjects ({results['split']} split). See report.md for every member and method.",
             "", format_table(rows, markdown=True)]
    fitted = results.get("fitted_point")
    if fitted:
        lines += ["", f"At the shipped operating point ({spec.operating_point().describe()}), {results['split']} "
                      f"split: BA {fitted['ba']:.3f}, sensitivity {fitted['sensitivity']:.3f}, specificity "
                      f"{fitted['specificity']:.3f}, {fitted['subjects_right']} of {fitted['subjects']} subjects "
                      "called right" + (" (thresholds fitted on these same out-of-fold predictions: optimistic; "
                                        "BENCHMARKS.md has them on donors of other batches)"
                                        if spec.cross_fitted else "") + "."]
    return lines
