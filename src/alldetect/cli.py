"""The ``alldetect`` command: one entry point with a subcommand per stage."""

from __future__ import annotations

import functools
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import typer

from .choices import (AdaptLayers, Augmentation, AugmentOn, Colour, Criterion, Device, Engine, Executor, History,
                      Profile, Sampling)
from .ensemble.adapt import MIN_CELLS as ADAPT_MIN_CELLS
from .ensemble.calibrate import PRIOR_DONORS
from .errors import AlldetectError, require_extra
from .formats.csvfiles import TEMPORARY_NAME_EXTRA
from .precision import INT8_TOLERANCE, Precision

if TYPE_CHECKING:
    from .data.geometry import FrameGeometry

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Acute lymphoblastic leukemia detection in white-blood-cell images with a weighted "
                       "ensemble of CNNs.")
logger = logging.getLogger("alldetect")


EnsembleDir = Annotated[Path, typer.Argument(help="Ensemble directory.")]
Method = Annotated[str | None, typer.Option(help="Ensemble method [default: the ensemble's].")]


def _choices(name: str, *values: str) -> type[Enum]:
    """A str Enum of ``values``: Typer lists them in the help and refuses anything else."""
    return Enum(name, {v: v for v in values}, type=str)


ImageFormat = _choices("ImageFormat", "bmp", "png")
Protocol = _choices("Protocol", "subject", "paper")
PointOption = Annotated[Criterion, typer.Option(
    "--operating-point", help="How each combiner's cell and patient thresholds are chosen: auto (balanced accuracy "
                              "on out-of-fold predictions when cross-fitted, else the paper's 0.5), paper, or "
                              "balanced_accuracy on the validation predictions (sensitivity and specificity: give "
                              "--sensitivity or --specificity with the target).")]
SensitivityOption = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Instead: the highest cell threshold that keeps at least this sensitivity.")]
SpecificityOption = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Instead: the lowest cell threshold that keeps at least this specificity.")]
SamplingOption = Annotated[Sampling | None, typer.Option(
    help="What an epoch draws: cells (every cell, the minority class oversampled: the paper), donors (classes "
         "and, within a class, donors weighing the same whatever their cell counts) or batches (as donors, but "
         "within a class each imaging batch, the folder above the class folders, weighs the same first) "
         "[default: the profile's: donors for plus, cells for paper and demo].")]
ColourOption = Annotated[Colour | None, typer.Option(
    help="How each member sets a cell's colour before its network: imagenet (the network's ImageNet mean and std: "
         "the paper), centre (the cell's own mean colour over its stained pixels subtracted) or standardise (and "
         "each channel scaled by the cell's own spread); stored in the ensemble and done inside the member, so "
         "predict, the web page and the ONNX graph do the same [default: the profile's: centre for plus, imagenet "
         "for paper and demo].")]
AugmentOption = Annotated[Augmentation | None, typer.Option(
    help="How training cells are varied: paper (flips, rotation, zoom, shift), dihedral (one of the eight flips and "
         "quarter turns), dihedral+stain (and brightness, saturation and hue jitter), dihedral+hestain (and "
         "albumentations' stain-matrix augmentation, in the loader's workers) or none [default: the profile's: "
         "dihedral for plus, paper for paper and demo].")]
DomainCheckOption = Annotated[bool, typer.Option(
    "--domain-check/--no-domain-check", help="Check every cell against what the ensemble's training cells look like "
                                             "and flag those unlike them (a patient with most cells flagged gets no "
                                             "call): a guard, not a guarantee.")]
FrameSizeOption = Annotated[int | None, typer.Option(
    min=1, help="Rescale each image's shorter side to this many pixels before the center crop: for frames of "
                "another size or magnification than C-NMC's 450x450 (e.g. 450 for 257x257 frames of a cell as "
                "large in its frame).")]
NoCropOption = Annotated[bool, typer.Option(
    "--no-crop", help="Each image already is the cell's crop: resize it whole to the crop instead of cutting out "
                      "the center.")]


def operating_criterion(choice: Criterion, sensitivity: float | None,
                        specificity: float | None) -> tuple[str, float | None]:
    """The criterion and target the options ask for; one at a time."""
    if sensitivity is not None and specificity is not None:
        raise AlldetectError("give --sensitivity or --specificity, not both")
    if choice in (Criterion.sensitivity, Criterion.specificity):
        raise AlldetectError(f"--operating-point {choice.value} needs its target: give --{choice.value} TARGET")
    if sensitivity is not None:
        return "sensitivity", sensitivity
    if specificity is not None:
        return "specificity", specificity
    return choice.value, None


Target = _choices("Target", "predicted", "all", "hem")


def user_errors(command: Callable) -> Callable:
    """Print our own errors as one red line and exit non-zero, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AlldetectError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None

    return wrapper


def frame_geometry(frame_size: int | None, no_crop: bool, max_pixels: int | None = None) -> FrameGeometry:
    """The ``FrameGeometry`` of --frame-size / --no-crop (a rescale making more than ``max_pixels`` refused; default
    the decoder's limit)."""
    from .data.geometry import FrameGeometry

    if frame_size and no_crop:
        raise AlldetectError("--frame-size and --no-crop exclude each other: rescale frames, or take each image "
                             "as the crop")
    return FrameGeometry(frame_size, no_crop) if max_pixels is None else FrameGeometry(frame_size, no_crop, max_pixels)


def writable_file(path: str | Path, siblings: tuple[str, ...] = ()) -> Path:
    """An output file path checked before any work: not a folder (nor written as one, ending in a slash), not a
    device, pipe or socket (or a link to one), its folder can be created and written, the ``siblings`` written
    beside it (suffixes that replace its own) are not folders either, and every name, with their temporary files'
    (``write_csv_atomic``), fits the file system."""
    from .formats.csvfiles import output_file_mode

    if str(path).endswith(("/", os.sep)):
        raise AlldetectError(f"{path}: names a folder; give the file to write, e.g. {Path(path) / 'predictions.csv'}")
    path = Path(path)
    if path.is_dir():
        raise AlldetectError(f"{path}: is a folder; give the file to write, e.g. {path / 'predictions.csv'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AlldetectError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise AlldetectError(f"{folder}: not writable")
    longest = max(len(os.fsencode(name)) for name in [path.name, *(path.stem + s for s in siblings)])
    most = os.pathconf(folder, "PC_NAME_MAX") - TEMPORARY_NAME_EXTRA
    if longest > most:
        raise AlldetectError(f"{path}: the file name is too long for this file system ({longest} bytes with what "
                             f"is written beside it; at most {most}); choose a shorter one")
    for target in [path, *(path.with_name(path.stem + s) for s in siblings)]:
        output_file_mode(target)
    return path


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is at the time of each record (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("PIL", "matplotlib", "timm", "urllib3", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into (C-NMC-2019 layout).")],
    size: Annotated[int, typer.Option(help="Frame side in pixels (C-NMC: 450).")] = 450,
    all_subjects: Annotated[int, typer.Option(help="ALL patients in the training folds.")] = 15,
    hem_subjects: Annotated[int, typer.Option(help="Healthy donors in the training folds.")] = 7,
    test_all_subjects: Annotated[int, typer.Option(help="ALL patients in the preliminary test set.")] = 4,
    test_hem_subjects: Annotated[int, typer.Option(help="Healthy donors in the preliminary test set.")] = 2,
    final_subjects: Annotated[int, typer.Option(help="Subjects in the unlabelled final test set.")] = 4,
    cells_per_subject: Annotated[int, typer.Option(help="Cell images per subject.")] = 20,
    image_format: Annotated[ImageFormat, typer.Option("--format", help="Image file format.")] = ImageFormat.bmp,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 0,
) -> None:
    """Write a synthetic C-NMC-2019 dataset: plausible cells that test the software, not the medicine."""
    from .data.synth import SynthConfig, generate

    cfg = SynthConfig(size=size, all_subjects=all_subjects, hem_subjects=hem_subjects,
                      test_all_subjects=test_all_subjects, test_hem_subjects=test_hem_subjects,
                      final_subjects=final_subjects, cells_per_subject=cells_per_subject,
                      image_format=image_format.value, seed=seed)
    try:
        counts = generate(out, cfg)
    except ValueError as e:
        raise AlldetectError(str(e)) from None
    typer.echo(f"wrote {sum(counts.values())} synthetic images to {out}: "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@app.command()
@user_errors
def index(
    data: Annotated[Path, typer.Argument(help="A C-NMC tree, a folder with all/ and hem/, or any image folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")] = Path("manifest.csv"),
) -> None:
    """Find and label the images under DATA and write a manifest (path,label,subject,split,image,cell,source).

    Unusable files are listed in <out>.problems.csv and skipped.
    """
    from .data.index import index_folder
    from .formats.manifest import summarize, write_manifest
    from .formats.problems import log_problems, write_problems
    from .formats.tables import format_table

    writable_file(out, siblings=(".problems.csv",))
    result = index_folder(data)
    write_manifest(result.rows, out)
    problems_file = out.with_suffix(".problems.csv")
    write_problems(result.problems, problems_file)
    if result.synthetic:
        typer.echo("dataset: SYNTHETIC (made by `alldetect synth`; it tests the software, not the medicine)")
    typer.echo(format_table(summarize(result.rows)))
    for warning in result.warnings:
        logger.warning(warning)
    log_problems(result.problems)
    skipped = sum(p.action == "skipped" for p in result.problems)
    typer.echo(f"wrote {out} ({len(result.rows)} images); {skipped} skipped, "
               f"{len(result.problems) - skipped} converted: see {problems_file}")


@app.command()
@user_errors
def split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV from `alldetect index`.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write (default: in place).")] = None,
    protocol: Annotated[Protocol, typer.Option(
        help="paper: prelim test set = test, training folds split 70/30 by subject (Table 3); "
             "subject: any manifest, by the fractions below.")] = Protocol.subject,
    val_fraction: Annotated[float | None, typer.Option(
        help="Share of each class's subjects for validation [default: 0.3 paper, 0.2 subject].")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of each class's subjects for test "
                                                             "(protocol subject) [default: 0.2].")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the subject shuffle.")] = 0,
) -> None:
    """Assign train/val/test by subject, stratified by class; no subject is ever in two splits."""
    from .formats.manifest import read_manifest, summarize, write_manifest
    from .data.split import paper_split, subject_split
    from .formats.tables import format_table

    rows = read_manifest(manifest)
    asked = {k: v for k, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)) if v is not None}
    if protocol is Protocol.paper:
        asked.pop("test_fraction", None)  # the preliminary test set is the test split
        rows = paper_split(rows, seed=seed, **asked)
    else:
        rows = subject_split(rows, seed=seed, **asked)
    write_manifest(rows, out or manifest)
    typer.echo(format_table(summarize(rows, by="split")))
    typer.echo(f"wrote {out or manifest}: subject-disjoint splits checked")


@app.command()
@user_errors
def train(
    manifest: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Split manifest CSV.")],
    member: Annotated[str, typer.Option(help="Network: vgg16, xception, mobilenet, inception_resnet_v2, "
                                             "densenet121, or an extra member (see `alldetect members`).")]
    = "densenet121",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory [default: runs/<member>].")] = None,
    profile: Annotated[Profile, typer.Option(
        help="paper: the paper's protocol; plus: what generalised to unseen donors (AdamW + warm-up/cosine, "
             "label smoothing, dihedral augmentation, last epoch); demo: small and quick.")] = Profile.paper,
    epochs: Annotated[int | None, typer.Option(help="Epochs [paper: 12 = one triangular2 cycle; plus: 12].")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per optimizer step [paper profile: 32].")] \
    = None,
    crop: Annotated[int | None, typer.Option(help="Center-crop side in pixels [paper: 300].")] = None,
    input_size: Annotated[int | None, typer.Option(help="Resize crops to this side (default: no resize).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local ImageNet weights: a file, or a folder of them.")]
    = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained",
                                                    help="Start from ImageNet weights [profile default: paper and "
                                                         "plus yes, demo no].")] = None,
    sampling: SamplingOption = None,
    colour: ColourOption = None,
    augment: AugmentOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>/checkpoints/last.pt.")] = False,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers [auto].")] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the network.")] = False,
    augment_on: Annotated[AugmentOn, typer.Option(
        help="Where augmentation runs: loader (per image, DataLoader workers) or device (the crops held on the "
             "training device, each batch augmented there); auto: device on a GPU (loader for dihedral+hestain), "
             "loader on a CPU.")]
    = AugmentOn.auto,
    precision: Annotated[Precision, typer.Option(
        help="auto: bf16 autocast on CUDA, fp32 on CPU; or force bf16 or fp32.")] = Precision.auto,
    ema_decay: Annotated[float | None, typer.Option(
        min=0.0, max=0.9999, help="Validate and keep an exponential moving average of the weights, updated every "
                                  "step with this decay [profile default].")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Also checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
) -> None:
    """Fine-tune one member and write a run directory.

    paper profile: Adamax (lr 2e-4, betas 0.9/0.999), triangular2 cyclic lr 1e-7..2e-3 with a step of 6
    epochs, cross-entropy, oversampled and augmented 300x300 center crops; the epoch with the best validation
    balanced accuracy is kept. plus profile: AdamW (lr 1e-4, weight decay 0.05), one epoch of warm-up then
    cosine, label smoothing 0.1, the eight flips/rotations, 12 epochs, the last epoch kept. Launch with
    torchrun for several GPUs or nodes.
    """
    from .training import fit, profile_config

    cfg = profile_config(profile, member=member, manifest=str(manifest), out=str(out or Path("runs") / member),
                         epochs=epochs, batch_size=batch_size, crop=crop, input_size=input_size,
                         weights=str(weights) if weights else None, pretrained=True if weights else pretrained,
                         device=device.value, workers=workers, compile=compile or None, precision=precision.value,
                         augment_on=augment_on.value, ema_decay=ema_decay, sampling=sampling and sampling.value,
                         colour=colour and colour.value, augment=augment and augment.value,
                         checkpoint_every=checkpoint_every, seed=seed)
    run = fit(cfg, resume=resume)
    typer.echo(f"run directory: {run}")


@app.command()
def members() -> None:
    """List the available members (* = the paper's five)."""
    from .models import list_members, member_spec

    for name in list_members():
        spec = member_spec(name)
        typer.echo(f"{'*' if spec.paper else ' '} {name:<20} timm: {spec.timm_name:<24} grad-cam: {spec.cam_layer}")


@app.command()
@user_errors
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Predictions CSV (path,label,prob_all[,model,subject]).")],
    threshold: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="P(ALL) at or above which a cell (and a subject's mean) is called ALL [default: "
                               "the operating point of --ensemble, else 0.5].")] = None,
    ensemble_dir: Annotated[Path | None, typer.Option(
        "--ensemble", help="Ensemble folder whose fitted operating points call the cells and subjects of its "
                           "methods (members: 0.5).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (keyed by model).")] = False,
    ci: Annotated[int, typer.Option(min=0, help="Bootstrap resamples over subjects for 95% CIs (0: none).")] = 0,
    sensitivity: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Also report the operating point that reaches this sensitivity.")] = None,
    subjects: Annotated[bool, typer.Option(help="Also print subject-level results.")] = False,
) -> None:
    """Metrics per model: WP, WR, WFS, ACC, BA, AUC, kappa, sensitivity, specificity and confusion counts.

    When the predictions carry the domain check (in_domain, from `predict`), the figures are on the cells inside
    it and coverage is the share of cells they cover.
    """
    import json

    from .evaluation.evaluate import evaluate_predictions
    from .formats.operating_point import PAPER_POINT, OperatingPoint
    from .formats.predictions import read_predictions
    from .formats.tables import format_table

    spec = None
    if ensemble_dir is not None:
        from .ensemble.folder import EnsembleFolder

        spec = EnsembleFolder(ensemble_dir).spec
    results, subject_tables, points = {}, {}, {}
    for model, p in read_predictions(predictions).items():
        method = model.removesuffix("+tta")
        if threshold is not None:
            points[model] = OperatingPoint(threshold, threshold)
        else:
            points[model] = spec.operating_point(method) if spec and method in spec.methods else PAPER_POINT
        results[model], table = evaluate_predictions(p.inside(), point=points[model], ci=ci,
                                                     sensitivity=sensitivity, subjects=subjects,
                                                     source=str(predictions))
        results[model]["threshold"] = points[model].cell_threshold
        if p.in_domain is not None:  # figures on the cells inside the domain, their share beside them
            results[model]["coverage"] = float(p.in_domain.mean())
        if table is not None:
            subject_tables[model] = table
    if as_json:
        typer.echo(json.dumps(next(iter(results.values())) if len(results) == 1 else results, indent=2))
        return
    typer.echo(format_table([{"model": m, **{k: v for k, v in r.items() if not isinstance(v, dict)}}
                             for m, r in results.items()]))
    for m, r in results.items():
        if "ci95" in r:
            typer.echo(f"{m} 95% CI: " + ", ".join(f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in r["ci95"].items()))
        if "operating_point" in r:
            op = r["operating_point"]
            typer.echo(f"{m}: threshold {op['threshold']:.4f} gives sensitivity {op['sensitivity']:.3f}, "
                       f"specificity {op['specificity']:.3f}")
    for m, table in subject_tables.items():
        typer.echo(f"\n{m}: subject level ({points[m].describe()})")
        typer.echo(format_table(table))


@app.command()
@user_errors
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Member run directories from `alldetect train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Ensemble directory to write.")] = Path("runs/ensemble"),
    method: Annotated[str, typer.Option(help="Default method for predict/export/serve.")] = "wen_kappa",
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Fit the combiners on test-time-augmented "
                                                                  "probabilities and score with TTA [default: when "
                                                                  "every member trained on the 8 flips/rotations, "
                                                                  "as in the plus profile].")] = None,
    operating_point: PointOption = Criterion.auto,
    sensitivity: SensitivityOption = None,
    specificity: SpecificityOption = None,
) -> None:
    """Combine member runs with SAP, WEN (acc, auc, f1, kappa) and better combiners, fitted on validation.

    Several runs of one member are the fold models of a cross-fit (each validated on donors the others trained
    on): the member scores as their average and everything is fitted on their out-of-fold predictions.
    The folder written is the whole model: member weights, combiners, preprocessing, a model card. Copy it.
    """
    from .ensemble.build import build_ensemble

    criterion, target = operating_criterion(operating_point, sensitivity, specificity)
    spec = build_ensemble(runs, out, default_method=method, tta=tta, operating_point=criterion, target=target)
    typer.echo(f"wrote {out}: {len(spec.members)} members, methods {', '.join(spec.methods)}; "
               f"default {spec.default_method}{' with TTA' if spec.tta else ''}")
    typer.echo(f"operating point: {spec.operating_point().describe()}")


@app.command()
@user_errors
def report(
    ens_dir: Annotated[Path, typer.Argument(help="Ensemble directory from `alldetect ensemble`.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples over subjects.")] = 1000,
) -> None:
    """Write report.md with Table 4/5, ROC, calibration and subject-level results."""
    from .report.build import make_report

    path = make_report(ens_dir, n_boot=bootstrap)
    typer.echo(f"report: {path}")


@app.command()
@user_errors
def predict(
    ens_dir: EnsembleDir,
    inputs: Annotated[list[Path], typer.Argument(help="Image files, folders, or a C-NMC tree.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Predictions CSV to write.")] = "predictions.csv",
    method: Method = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Test-time augmentation: each member's P(ALL) "
                                                                  "averaged over the 8 flips/rotations of the cell "
                                                                  "[default: as the ensemble was fitted; on for the "
                                                                  "plus profile].")] = None,
    cam: Annotated[Path | None, typer.Option(help="Write a Grad-CAM overlay of every cell flagged ALL here.")]
    = None,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.auto,
    engine: Annotated[Engine, typer.Option(help="auto: on a CPU the exported int8 graph, else torch in bf16 on a "
                                                "CPU with native bf16, else the exported fp32 graph, else torch; "
                                                "torch in bf16 on a GPU.")] = Engine.auto,
    precision: Annotated[Precision, typer.Option(help="auto: as the engine's choice; bf16 runs on torch, int8 on "
                                                      "the exported int8 graph.")] = Precision.auto,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Cells per batch [default: the engine's, 256 on a GPU, "
                                                           "32 on a CPU].")] = None,
    domain_check: DomainCheckOption = True,
    frame_size: FrameSizeOption = None,
    no_crop: NoCropOption = False,
) -> None:
    """P(ALL) per cell from every member and the ensemble; a patient summary when subjects are known.

    Unreadable files get a row with an error; the exit status is 1 if any file failed. Cells unlike the
    training cells are flagged (in_domain no, with the reason): a guard, not a guarantee.
    """
    from .ensemble.folder import EnsembleFolder
    from .formats.tables import format_table
    from .inference.load import load_engine
    from .inference.predict import collect_inputs, predict_rows

    geometry = frame_geometry(frame_size, no_crop)
    if cam is not None:
        require_extra("explain", "--cam (Grad-CAM)")
    out = writable_file(out, siblings=(".patients.csv", ".submission.txt"))
    folder = EnsembleFolder(ens_dir)  # one reading of ensemble.json for the engine and the Grad-CAM members
    model = load_engine(folder, method=method, device=device.value, engine=engine.value, precision=precision.value)
    logger.info("engine: %s", type(model).__name__)
    collected = collect_inputs(inputs)
    summary = predict_rows(model, collected, out, tta=tta, batch_size=batch_size, domain_check=domain_check,
                           geometry=geometry)
    typer.echo(f"wrote {summary.csv}: {summary.scored} cells scored, {summary.failed} failed; "
               f"{len(summary.flagged)} called ALL")
    if summary.out_of_domain:
        logger.warning("%d of %d cells are unlike the cells this ensemble was trained on (in_domain no; see "
                       "domain_note): their P(ALL) is not to be trusted", summary.out_of_domain, summary.scored)
    typer.echo(f"operating point: {summary.operating_point.describe()}")
    if summary.patients:
        typer.echo(f"patients: {summary.patients_csv}")
        typer.echo(format_table(summary.patients))
    if summary.submission:
        typer.echo(f"challenge submission: {summary.submission}")
    flagged = set(summary.flagged)
    if cam is not None and flagged:
        from .inference.explain import explain_files

        explain_files(folder, [r.path for r in collected.rows if r.path in flagged], cam, method=method,
                      device=device.value, rows_per_grid=8)
        typer.echo(f"Grad-CAM overlays of {len(flagged)} flagged cell(s): {cam}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def adapt(
    ens_dir: EnsembleDir,
    cells: Annotated[list[Path], typer.Argument(help="Unlabelled cells of one imaging batch of the site: files or "
                                                     "folders, many donors, both kinds as they come.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new ensemble folder (new or empty).")],
    layers: Annotated[AdaptLayers, typer.Option(help="The BatchNorm layers re-estimated: every one, or the early "
                                                     "ones.")] = AdaptLayers.all,
    site_weight: Annotated[float, typer.Option(help="The site's statistics' weight against the training ones, "
                                                    "in (0, 1].")] = 1.0,
    min_cells: Annotated[int, typer.Option(help="Fewest usable cells to adapt on.")] = ADAPT_MIN_CELLS,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.auto,
) -> None:
    """A new ensemble folder adapted to a site's imaging batch without labels: each member's BatchNorm statistics
    re-estimated on the site's cells. Refused on too few cells, on one donor's cells, or on cells mostly unlike
    the training cells."""
    import alldetect
    from .ensemble.derive import check_new_folder

    check_new_folder(out, ens_dir)
    adapted = alldetect.load(ens_dir, engine="torch", device=device.value).adapt(
        cells, layers=layers.value, site_weight=site_weight, min_cells=min_cells)
    step = adapted.changes.spec.site[-1]
    saved = adapted.save(out)
    typer.echo(f"wrote {saved.folder.path}: adapted on {step['cells']} cells ({step['adapted_layers']} BatchNorm "
               f"layers; {step.get('graphs', 'no graphs in the source')})")


@app.command()
@user_errors
def calibrate(
    ens_dir: EnsembleDir,
    data: Annotated[list[Path], typer.Argument(help="Labelled cells of at least two ALL and two healthy donors of "
                                                    "the site, named as C-NMC names them (UID_<donor>_..._all.bmp) "
                                                    "or in a C-NMC tree.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new ensemble folder (new or empty).")],
    prior_donors: Annotated[float, typer.Option(help="How many site donors the shipped operating point is worth: "
                                                     "the site's own fit weighs n / (n + this).")] = PRIOR_DONORS,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.auto,
) -> None:
    """A new ensemble folder whose operating points (cell and patient thresholds, fewest cells for a call) are
    fitted on a few labelled donors of the site, shrunk toward the shipped ones."""
    import alldetect
    from .ensemble.derive import check_new_folder

    check_new_folder(out, ens_dir)
    calibrated = alldetect.load(ens_dir, engine="torch", device=device.value).calibrate(data, prior_donors=prior_donors)
    step = calibrated.changes.spec.site[-1]
    saved = calibrated.save(out)
    loo = step["leave_one_out"]
    typer.echo(f"wrote {saved.folder.path}: {saved.operating_point.describe()}")
    typer.echo(f"leaving one of the {loo['donors']} calibration donors out at a time: {loo['donors_right']} right, "
               f"cell sensitivity {loo['sensitivity']:.3f}, specificity {loo['specificity']:.3f}")


@app.command()
@user_errors
def export(
    ens_dir: EnsembleDir,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="ONNX file [default: ENS_DIR/ensemble.onnx].")]
    = None,
    method: Annotated[str | None, typer.Option(help="Ensemble method in the graph [default: the ensemble's].")]
    = None,
    input_dtype: Annotated[str, typer.Option(help="uint8 (0-255) or float32 (0-1) NHWC input.")] = "uint8",
    int8: Annotated[bool, typer.Option(help="Also write a static int8 copy (.int8.onnx), calibrated on "
                                            "validation cells: the fastest CPU engine.")] = True,
    calibration: Annotated[list[Path] | None, typer.Option(
        help="Cell images or folders to calibrate int8 on [default: the ensemble's validation cells].")] = None,
    calibration_cells: Annotated[int, typer.Option(help="Most cells used for int8 calibration.")] = 128,
    int8_tolerance: Annotated[float, typer.Option(help="A member whose P(ALL) int8 moves by more than this on "
                                                       "average over the calibration cells stays fp32.")]
    = INT8_TOLERANCE,
) -> None:
    """Export every member, its normalisation and the weighted average as one ONNX graph."""
    require_extra("onnx", "export")
    from .export.ensemble import export_ensemble

    if out is not None:
        writable_file(out, siblings=(".int8.onnx",))

    result = export_ensemble(ens_dir, out=out, method=method, input_dtype=input_dtype, int8=int8,
                             calibration=calibration, calibration_cells=calibration_cells,
                             int8_tolerance=int8_tolerance)
    typer.echo(f"wrote {result.fp32} ({result.fp32.stat().st_size / 1e6:.0f} MB)")
    if int8:
        typer.echo(result.describe_int8())


@app.command()
@user_errors
def explain(
    ens_dir: EnsembleDir,
    images: Annotated[list[Path], typer.Argument(help="Cell images (a few; one grid row each).")],
    method: Method = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays and the grid.")] = Path("gradcam"),
    target: Annotated[Target, typer.Option(help="Class the maps explain.")] = Target.predicted,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.auto,
) -> None:
    """Grad-CAM of every member and of the ensemble (weighted like its probabilities), as in Figs. 6-8."""
    require_extra("explain", "explain")
    from .inference.explain import explain_files

    grid, = explain_files(ens_dir, images, out, method=method, device=device.value, target=target.value)
    typer.echo(f"Grad-CAM grid: {grid}")


@app.command()
@user_errors
def serve(
    ens_dir: EnsembleDir,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    db: Annotated[Path, typer.Option(help="SQLite file recording every prediction.")]
    = Path("alldetect-predictions.sqlite"),
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Largest request, in MiB.")] = 50,
    max_files: Annotated[int, typer.Option(min=1, help="Most cells per request (zip entries included).")] = 500,
    max_request_megapixels: Annotated[int, typer.Option(min=1, help="Most pixels of all images of one request, "
                                                                    "read from their headers before decoding (a "
                                                                    "C-NMC frame: 0.2).")] = 100,
    max_queued: Annotated[int, typer.Option(min=1, help="Requests whose body is in and that wait to be scored; "
                                                        "more are answered 503 with Retry-After.")] = 16,
    max_receiving: Annotated[int, typer.Option(min=1, help="Request bodies being received at once, each up to "
                                                           "--max-upload-mb; more are answered 503.")] = 64,
    max_receiving_per_client: Annotated[int, typer.Option(min=1, help="Of those, from one address (an IPv6 /64): "
                                                                      "a client that sends slowly leaves room for "
                                                                      "others.")] = 8,
    receiving_reserve: Annotated[int, typer.Option(min=0, help="Places beyond --max-receiving, each for a client "
                                                               "with no upload arriving: a few addresses that fill "
                                                               "the rest do not shut others out.")] = 16,
    max_cam_cells: Annotated[int, typer.Option(min=1, help="Most Grad-CAM overlays per request (?cam=true).")] = 32,
    max_cam_queued: Annotated[int, typer.Option(min=1, help="Grad-CAM requests waiting or being made, one per "
                                                            "client; Grad-CAM runs beside the scoring, not in its "
                                                            "place.")] = 2,
    device: Annotated[Device, typer.Option(help="Where to run the models.")] = Device.auto,
    engine: Annotated[Engine, typer.Option(
        help="prefer-onnx: the exported ONNX graph (`alldetect export`, int8 if written) when there is one, "
             "else as auto. auto: as `predict --engine auto`.")] = Engine.prefer_onnx,
    allow_host: Annotated[list[str] | None, typer.Option(
        help="Another host name clients may use to reach the server (repeatable); requests naming any other "
             "Host are refused [default: the bound address and the loopback names].")] = None,
    history: Annotated[History, typer.Option(
        help="What /history shows: private, each browser its own predictions; shared, everyone's; off, "
             "nothing (every prediction is recorded in --db either way).")] = History.private,
    header_timeout: Annotated[float, typer.Option(min=1, help="Seconds a connection may take to send a "
                                                              "request's headers; then it is closed.")] = 10,
    send_timeout: Annotated[float, typer.Option(min=1, help="Seconds an answer may wait for its client to read "
                                                            "some of it; then the connection is closed.")] = 30,
    body_timeout: Annotated[float, typer.Option(min=1, help="Seconds a request's body may take to arrive "
                                                            "after its headers; then it is closed.")] = 120,
    max_connections: Annotated[int, typer.Option(min=2, help="Open connections in all; past it the connection "
                                                             "waiting longest for its headers (or for its client "
                                                             "to read) is closed.")] = 4096,
    max_per_client: Annotated[int | None, typer.Option(min=1, help="Open connections from one address [default: "
                                                                   "half of --max-connections].")] = None,
    rate_per_client: Annotated[float, typer.Option(min=1, help="Requests one address may start a second, after a "
                                                              "burst of two seconds' worth; more wait their turn, "
                                                              "however many connections it opens.")] = 50,
    domain_check: DomainCheckOption = True,
    frame_size: FrameSizeOption = None,
    no_crop: NoCropOption = False,
) -> None:
    """A web page and JSON API for the lab: upload cells, see calls, Grad-CAM and a patient summary.

    Only same-origin browser requests are answered, and only for the Host names the server was bound to (or
    named with --allow-host), so a web page elsewhere cannot use or read it. Slow or half-open connections are
    closed after the time limits, and a flood of them cannot take every connection; a client that sends
    requests faster than --rate-per-client waits its turn.
    """
    require_extra("serve", "serve")
    require_extra("explain", "serve (its Grad-CAM)")
    from .serve import ServeSettings, create_app
    from .serve.connections import ConnectionLimits
    from .serve.server import make_server
    from .serve.uploads import Limits

    loopback = ("127.0.0.1", "localhost", "::1")
    wildcard = host in ("0.0.0.0", "::", "")
    hosts = tuple(dict.fromkeys([*loopback, *([] if wildcard else [host]), *(allow_host or [])]))
    connections = ConnectionLimits(header_seconds=header_timeout, body_seconds=body_timeout,
                                   send_seconds=send_timeout, max_connections=max_connections,
                                   max_per_client=max_per_client or max_connections // 2,
                                   requests_per_second=rate_per_client)
    settings = ServeSettings(db_path=str(db), device=device.value, engine=engine.value,
                             limits=Limits(max_request_bytes=max_upload_mb * 1024 * 1024, max_files=max_files,
                                           max_request_pixels=max_request_megapixels * 1_000_000),
                             max_queued=max_queued, max_receiving=max_receiving,
                             max_receiving_per_client=max_receiving_per_client,
                             receiving_reserve=receiving_reserve, max_cam_cells=max_cam_cells,
                             max_cam_queued=max_cam_queued, allowed_hosts=hosts,
                             history=history.value,
                             connections=connections, domain_check=domain_check,
                             geometry=frame_geometry(frame_size, no_crop, Limits().max_pixels))
    if host not in loopback:
        logger.warning("serving on %s: anyone who can reach this address can upload images", host)
    if wildcard and not allow_host:
        logger.warning("bound to every address, but only requests naming %s are answered; add --allow-host for "
                       "the names or addresses clients use", ", ".join(loopback))
    server, sockets = make_server(create_app(ens_dir, settings), host, port, connections)
    server.run(sockets=sockets)


@app.command()
@user_errors
def run(
    data: Annotated[Path | None, typer.Option(help="C-NMC-2019 tree or image folder [default: built-in synthetic "
                                                   "cells].")] = None,
    profile: Annotated[Profile | None, typer.Option(
        help="demo: small and quick; paper: the paper's protocol; plus: the paper's networks trained the way "
             "that generalised to unseen donors [default: demo on the synthetic cells; with --data, plus: the "
             "paper's five networks on a GPU, the three EfficientNet-Lite members at 96 px on a CPU].")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/demo"),
    members: Annotated[str | None, typer.Option(help="Comma-separated members [default: the paper's five; "
                                                     "efficientnet_lite0,1,2 on a CPU with --data].")] = None,
    input_size: Annotated[int | None, typer.Option(help="Resize the 300 px crops to this side [default: none; "
                                                        "96 on a CPU with --data; 80 for demo on --data].")]
    = None,
    weights_dir: Annotated[Path | None, typer.Option(help="Folder of local ImageNet weights, one per member.")]
    = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained",
                                                    help="Start from ImageNet weights [profile default].")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    epochs: Annotated[int | None, typer.Option(help="Override the profile's epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Override the profile's batch size.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the report's CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed for data, splits and training.")] = 0,
    export: Annotated[bool | None, typer.Option(
        "--export/--no-export", help="Also export the ensemble as ONNX, fp32 and calibrated int8, for fast CPU "
                                     "prediction [paper profile: yes; demo: no, it adds minutes].")] = None,
    folds: Annotated[int | None, typer.Option(
        min=1, help="Cross-fit: deal the donors into up to this many folds (each with a donor of each class) and "
                    "train each member once per fold, so every donor trains and is scored out of fold; 1: a "
                    "held-out validation split [default: plus cross-fits, in up to 5 folds on a GPU and 3 on a "
                    "CPU; paper and demo split].")]
    = None,
    operating_point: PointOption = Criterion.auto,
    sensitivity: SensitivityOption = None,
    specificity: SpecificityOption = None,
    sampling: SamplingOption = None,
    colour: ColourOption = None,
    augment: AugmentOption = None,
    force: Annotated[bool, typer.Option(help="Redo every stage.")] = False,
    executor: Annotated[Executor, typer.Option(help="Where the trainings (members x folds) run: none, one after "
                                                    "another in this process; local, as processes; slurm, as one "
                                                    "SLURM job array. Needs the 'cluster' extra.")] = Executor.none,
    jobs: Annotated[int | None, typer.Option(min=1, help="Most trainings at once [default: local, one per visible "
                                                         "GPU (one on a CPU, which shares its cores out); slurm, "
                                                         "all].")] = None,
    slurm_partition: Annotated[str | None, typer.Option(help="SLURM partition [default: the cluster's].")] = None,
    slurm_time_min: Annotated[int, typer.Option(min=1, help="Time limit of each training job, in minutes.")] = 240,
    slurm_gpus: Annotated[int, typer.Option(min=0, help="GPUs of each SLURM training job.")] = 1,
    sbatch: Annotated[list[str] | None, typer.Option(help="More sbatch options as KEY=VALUE, repeatable (e.g. "
                                                          "account=lab).")] = None,
) -> None:
    """Run the whole method: data -> index -> subject split -> five members -> ensembles -> report.

    The plus profile cross-fits: every labelled donor trains, in K-1 of K fold models per member, and the
    combiners and operating point are fitted on every donor's out-of-fold predictions.

    Finished stages are skipped on a rerun; an interrupted member resumes where it stopped.
    """
    from .models import member_spec
    from .pipeline import PipelineConfig, run_pipeline

    criterion, target = operating_criterion(operating_point, sensitivity, specificity)
    chosen = tuple(m.strip() for m in members.split(",")) if members else None
    for m in chosen or ():
        member_spec(m)
    cfg = PipelineConfig(out=str(out), data=str(data) if data else None, profile=profile, members=chosen,
                         input_size=input_size,
                         weights_dir=str(weights_dir) if weights_dir else None, pretrained=pretrained,
                         device=device.value, seed=seed, epochs=epochs, batch_size=batch_size, bootstrap=bootstrap,
                         export=export, folds=folds, operating_point=criterion, target=target, force=force,
                         sampling=sampling and sampling.value, colour=colour and colour.value,
                         augment=augment and augment.value, executor=executor.value, jobs=jobs,
                         slurm_partition=slurm_partition, slurm_time_min=slurm_time_min, slurm_gpus=slurm_gpus,
                         sbatch=tuple(sbatch or ()))
    report_path = run_pipeline(cfg)
    typer.echo(f"report: {report_path}")


if __name__ == "__main__":
    app()
