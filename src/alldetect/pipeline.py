"""``alldetect run``: the whole method in one command, as cached, resumable stages.

    (synthetic data) -> index -> subject split -> train each member -> ensemble -> Grad-CAM grid -> report
    -> (ONNX export, fp32 and int8: the paper profile, or asked for)

The ``plus`` profile cross-fits instead of holding donors out: every labelled donor is dealt into K folds by
subject, each member is trained K times on the other folds, the combiners and the operating point are fitted
on the out-of-fold predictions of every donor, and the ensemble ships each member as the average of its K fold
models. With a few dozen donors, donors are what generalisation needs; a validation split would take them away
and fit weights and thresholds on one or two healthy donors.

Each stage records the key of its inputs and config in ``<out>/stages.json``; a rerun skips stages whose key
and outputs are unchanged, resumes a member whose training was interrupted, and redoes a stage (and what
follows) when its inputs changed. ``force`` redoes everything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .data.index import SYNTHETIC_MARKER, index_folder
from .data.split import MOST_FOLDS, default_folds, fold_splits, paper_split, subject_folds, subject_split
from .data.synth import SynthConfig, generate
from .ensemble.build import build_ensemble
from .ensemble.folder import EnsembleFolder
from .errors import AlldetectError, first_line, has_extra, require_extra
from .export.ensemble import export_ensemble
from .formats.manifest import read_manifest, write_manifest
from .formats.predictions import read_predictions
from .formats.problems import write_problems
from .models.members import MEMBER_SETS, PAPER_MEMBERS
from .models.runtime import resolve_device
from .report.build import make_report
from .training import profile_config
from .choices import Executor, Profile
from .training.config import ADDED_FIELDS, DEMO_CROP, MACHINERY, RECIPES, TrainConfig
from .training.jobs import JobSettings, Training, run_jobs, train_job

logger = logging.getLogger(__name__)

# the demo's synthetic set: small frames so that five members train in minutes on a laptop CPU
DEMO_SYNTH = SynthConfig(size=112, all_subjects=12, hem_subjects=6, test_all_subjects=4, test_hem_subjects=2,
                         final_subjects=2, cells_per_subject=10)
GRID_CELLS = 4  # Grad-CAM grid rows: half ALL, half HEM
LOCK_FILE = ".alldetect-run.lock"  # held by the `alldetect run` writing the folder


@dataclass(frozen=True)
class PipelineConfig:
    out: str = "runs/demo"
    data: str | None = None                  # a C-NMC tree or image folder; None: built-in synthetic set
    profile: Profile | None = None           # None: demo on synthetic cells, plus on real ones (see choose_recipe)
    members: tuple[str, ...] | None = None   # None: the paper's five (the three Lite members on a CPU with real data)
    input_size: int | None = None            # resize crops to this side; None: the profile's choice
    sampling: str | None = None              # choices.Sampling; None: the profile's
    colour: str | None = None                # choices.Colour; None: the profile's
    augment: str | None = None               # choices.Augmentation; None: the profile's
    weights_dir: str | None = None           # local ImageNet weights, one file per member
    pretrained: bool | None = None           # None: the profile's choice
    device: str = "auto"
    seed: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    bootstrap: int = 1000
    export: bool | None = None               # None: the paper profile exports, the demo does not
    folds: int | None = None                 # most donor folds of the cross-fit (fewer when a class has fewer
                                             # donors); None: plus cross-fits in up to 5, paper and demo do not;
                                             # 1: a held-out validation split
    operating_point: str = "auto"            # see build_ensemble: auto, paper, balanced_accuracy, sensitivity,
    target: float | None = None              # specificity (the last two at least ``target``)
    force: bool = False
    report: bool = True                      # the report and its Grad-CAM grid (a yardstick reads the ensemble)
    executor: str = Executor.none.value      # where the trainings run: see training.jobs.JobSettings
    jobs: int | None = None
    slurm_partition: str | None = None
    slurm_time_min: int = JobSettings.time_min
    slurm_gpus: int = JobSettings.gpus_per_job
    sbatch: tuple[str, ...] = ()

    @property
    def job_settings(self) -> JobSettings:
        return JobSettings(self.executor, self.jobs, self.slurm_partition, self.slurm_time_min, self.slurm_gpus,
                           tuple(self.sbatch))

    @property
    def cross_fits(self) -> bool:
        return self.folds is None and self.profile is Profile.plus or (self.folds or 1) > 1


@dataclass(frozen=True)
class Stage:
    """One cached step of `alldetect run`: redone when what it depends on changed or an output is missing."""
    name: str
    inputs: dict                # what its result depends on (hashed together with every stage before it)
    outputs: list[Path]         # what it writes
    run: Callable[[str], None]  # does the work, told the stage's status: new, changed, started or done
    training: TrainConfig | None = None  # a member's training: with --executor, run as a job with the others


class Stages:
    """Keys of finished and started stages, persisted (atomically) after every change."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        self.state = {} if force or not (path.exists() or path.is_symlink()) else self._read(path)

    @staticmethod
    def _read(path: Path) -> dict:
        remedy = "delete it to redo every stage, or run with --force"
        try:
            state = json.loads(path.read_bytes())
        except IsADirectoryError:
            raise AlldetectError(f"{path}: is a folder, not the stage record; {remedy}") from None
        except (OSError, ValueError) as e:  # ValueError: empty, not JSON, not UTF-8
            raise AlldetectError(f"{path}: not a stage record alldetect can read ({first_line(e)}); {remedy}") \
                from None
        if not isinstance(state, dict) or not all(isinstance(v, dict) and isinstance(v.get("key"), str)
                                                  and isinstance(v.get("done"), bool) for v in state.values()):
            raise AlldetectError(f"{path}: not a stage record alldetect wrote; {remedy}")
        return state

    def status(self, name: str, key: str) -> str:
        entry = self.state.get(name)
        if entry is None:
            return "new"
        if entry["key"] != key:
            return "changed"
        return "done" if entry["done"] else "started"

    def mark(self, name: str, key: str, *, done: bool) -> None:
        self.state[name] = {"key": key, "done": done}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.path)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for one `alldetect run` at a time: a second one into the same folder would train into the same
    member folders. The lock is the kernel's (``flock``), so it goes with the process however that ends."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as lock:  # never written: a rerun changes no file it does not redo
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlldetectError(f"{out}: another `alldetect run` is writing this folder; wait for it to end, or "
                                 "choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or finish) every stage, one `alldetect run` at a time in an output folder; returns the report path (the
    ensemble folder's, without a report)."""
    cfg = choose_recipe(cfg)
    if cfg.export:
        require_extra("onnx", "--export")  # before hours of training, not after
    cfg.job_settings.check()  # before any work: submitit installed, sbatch there
    out = Path(cfg.out).resolve()
    with output_lock(out):
        return _run_stages(cfg, out)


def _run_stages(cfg: PipelineConfig, out: Path) -> Path:
    stages = Stages(out / "stages.json", cfg.force)
    data_dir = Path(cfg.data).resolve() if cfg.data else out / "data"
    manifest = out / "manifest.csv"
    steps: list[Stage] = []
    if cfg.data is None and not cfg.cross_fits:
        steps.append(Stage("synth", inputs=asdict(replace(DEMO_SYNTH, seed=cfg.seed)),
                           outputs=[data_dir / SYNTHETIC_MARKER],
                           run=lambda status: generate(data_dir, replace(DEMO_SYNTH, seed=cfg.seed))))
    if cfg.cross_fits:
        folds = _run_index_and_folds(data_dir, out, cfg)  # the fold count names the stages that follow
        train_cfgs = [_train_config(cfg, member, out / "folds" / f"fold{k}.csv", f"fold{k}")
                      for member in cfg.members for k in range(folds)]
        synth = asdict(replace(DEMO_SYNTH, seed=cfg.seed)) if cfg.data is None else None
        steps.append(Stage("index+folds", inputs={"data": str(data_dir), "seed": cfg.seed, "folds": folds,
                                                  "synth": synth},
                           outputs=[out / "folds" / f"fold{k}.csv" for k in range(folds)],
                           run=lambda status: None))  # done by _run_index_and_folds above
    else:
        train_cfgs = [_train_config(cfg, member, manifest) for member in cfg.members]
        steps.append(Stage("index+split", inputs={"data": str(data_dir), "seed": cfg.seed}, outputs=[manifest],
                           run=lambda status: _index_and_split(data_dir, manifest, cfg.seed)))
    for tc in train_cfgs:
        run_dir = Path(tc.out)
        name = f"train {tc.member}" + (f" {run_dir.name}" if cfg.cross_fits else "")
        steps.append(Stage(name, inputs=_shaping(tc), outputs=[run_dir / "metrics.json"],
                           run=lambda status, name=name, tc=tc: _train(name, tc, status), training=tc))
    folder = EnsembleFolder(out / "ensemble")
    ens_dir = folder.path
    steps.append(Stage("ensemble", inputs={"members": [t.out for t in train_cfgs],
                                           "operating_point": cfg.operating_point, "target": cfg.target},
                       outputs=[ens_dir / folder.SPEC],
                       run=lambda status: build_ensemble([t.out for t in train_cfgs], folder,
                                                         operating_point=cfg.operating_point, target=cfg.target)))
    if cfg.report and has_extra("explain"):
        steps.append(Stage("explain", inputs={"cells": GRID_CELLS},
                           outputs=[ens_dir / folder.GRADCAM / "gradcam_grid.png"],
                           run=lambda status: _explain_examples(folder, cfg.device)))
    elif cfg.report:
        logger.warning("no Grad-CAM grid in the report: it needs alldetect's 'explain' extra "
                       "(pip install 'alldetect[explain]')")
    if cfg.report:
        steps.append(Stage("report", inputs={"bootstrap": cfg.bootstrap, "seed": cfg.seed},
                           outputs=[ens_dir / folder.REPORT],
                           run=lambda status: make_report(folder, n_boot=cfg.bootstrap, seed=cfg.seed)))
    if _exports(cfg):
        steps.append(Stage("export", inputs={"int8": True}, outputs=[folder.graph()],
                           run=lambda status: _export(folder)))

    keys, upstream = [], ""
    for stage in steps:  # a stage's key: its inputs and those of every stage before it
        keys.append(_hash({"fields": stage.inputs, "upstream": upstream}))
        upstream = _hash({"upstream": upstream, "key": keys[-1]})
    jobs = cfg.job_settings
    with logging_redirect_tqdm(), tqdm(total=len(steps), desc="alldetect run", unit="stage", position=0,
                                       disable=None) as bar:
        for i, (stage, key) in enumerate(zip(steps, keys)):
            status = stages.status(stage.name, key)
            if status == "done" and all(p.exists() for p in stage.outputs):
                logger.info("%s: up to date, skipped", stage.name)
            elif stage.training is not None and jobs.executor != Executor.none:
                _train_as_jobs([(s, k) for s, k in zip(steps[i:], keys[i:]) if s.training is not None], stages,
                               jobs, out / "jobs")
            else:
                bar.set_postfix_str(stage.name)
                logger.info("%s: %s", stage.name, {"new": "running", "changed": "inputs changed, redoing",
                                                   "started": "resuming", "done": "outputs missing, redoing"}[status])
                stages.mark(stage.name, key, done=False)
                stage.run(status)
                stages.mark(stage.name, key, done=True)
            bar.update(1)
    return ens_dir / folder.REPORT if cfg.report else ens_dir


def _train_as_jobs(trainings: list[tuple[Stage, str]], stages: Stages, settings: JobSettings, folder: Path) -> None:
    """Every training not yet done, as jobs of ``settings.executor``; those that finish are marked done, so a
    rerun submits only what is missing or failed. Any failure ends the run, one line per failed job."""
    todo = []
    for stage, key in trainings:
        status = stages.status(stage.name, key)
        if status == "done" and all(p.exists() for p in stage.outputs):
            continue
        todo.append((Training.at(stage.name, stage.training, status), key))
        stages.mark(stage.name, key, done=False)
    if not todo:
        return
    logger.info("%d training(s) as jobs (--executor %s); logs in %s", len(todo), settings.executor, folder)
    run_jobs([t for t, _ in todo], settings, folder)
    for training, key in todo:
        if training.failure is None:
            stages.mark(training.name, key, done=True)
    failures = [t.failure for t, _ in todo if t.failure]
    if failures:
        raise AlldetectError(f"{len(failures)} of {len(todo)} training job(s) failed: " + "; ".join(failures)
                             + "; run again to resubmit only those")


def choose_recipe(cfg: PipelineConfig) -> PipelineConfig:
    """Fill in the profile, members and input size the user left open, and say what was chosen and why."""
    if cfg.data is None:
        recipe = RECIPES["synthetic"]
        return replace(cfg, profile=cfg.profile or recipe.profile, members=cfg.members or MEMBER_SETS[recipe.members])
    if cfg.profile is not None:
        input_size = cfg.input_size or (DEMO_CROP if cfg.profile is Profile.demo else None)
        return replace(cfg, members=cfg.members or PAPER_MEMBERS, input_size=input_size)
    if resolve_device(cfg.device).type == "cuda":
        recipe = RECIPES["gpu"]
        logger.info("real cells on a GPU: the plus profile with the paper's five networks at 300 px "
                    "(--profile paper for the paper's protocol exactly)")
        return replace(cfg, profile=recipe.profile, members=cfg.members or MEMBER_SETS[recipe.members])
    recipe = RECIPES["cpu"]
    members = cfg.members or MEMBER_SETS[recipe.members]
    input_size = cfg.input_size or recipe.input_size
    folds = cfg.folds or recipe.folds
    logger.info("real cells without a GPU: the plus profile with %s (ImageNet weights from pip packages), 300 px "
                "crops resized to %d px, cross-fitted in %d folds of donors, so that about 1,500 cells train in "
                "about %d minutes on 2 cores; for the paper's protocol (five networks at 300 px, hours on a CPU) "
                "pass --profile paper", ", ".join(members), input_size, folds, recipe.minutes)
    return replace(cfg, profile=recipe.profile, members=members, input_size=input_size, folds=folds)


def _train_config(cfg: PipelineConfig, member: str, manifest: Path, fold: str = ""):
    run_dir = Path(cfg.out).resolve() / "members" / member / fold
    overrides = dict(member=member, manifest=str(manifest), out=str(run_dir),
                     seed=cfg.seed, device=cfg.device, epochs=cfg.epochs, batch_size=cfg.batch_size,
                     weights=cfg.weights_dir, pretrained=cfg.pretrained, input_size=cfg.input_size,
                     sampling=cfg.sampling, colour=cfg.colour, augment=cfg.augment)
    if cfg.data is None:  # the built-in synthetic frames, whatever the profile
        overrides["crop"] = DEMO_CROP
    elif cfg.profile is Profile.demo:  # real 450 px frames: the paper's crop, resized
        overrides["crop"] = TrainConfig.crop
    return profile_config(cfg.profile, **overrides)


def _shaping(tc) -> dict:
    """The config fields that change a member's result (not where or how fast it runs); a field added later is
    left out at the value that does what runs made before it did, so that they stay finished."""
    return {k: v for k, v in asdict(tc).items()
            if k not in MACHINERY and not (k in ADDED_FIELDS and ADDED_FIELDS[k] == v)}


def _train(name: str, tc: TrainConfig, status: str) -> None:
    training = Training.at(name, tc, status)
    train_job(tc, training.resume, training.afresh, threads=None)


def _index_and_split(data_dir: Path, manifest: Path, seed: int) -> None:
    result = index_folder(data_dir)
    for warning in result.warnings:
        logger.warning(warning)
    write_problems(result.problems, manifest.with_suffix(".problems.csv"))
    rows = result.rows
    if any(r.source == "prelim" for r in rows):
        rows = paper_split(rows, seed=seed)
    else:
        rows = subject_split(rows, seed=seed)
    write_manifest(rows, manifest)
    logger.info("manifest: %s (%d images)", manifest, len(rows))


def _run_index_and_folds(data_dir: Path, out: Path, cfg: PipelineConfig) -> int:
    """Index the data (once the synthetic set exists) and write one manifest per fold; returns the fold count.
    Run before the stages are listed, on a cached run too: the fold count names the training stages, and only
    indexing notices donors added to or removed from the tree (which must change the folds). Indexing reads file
    names and image headers, not pixels; a fold manifest that did not change is not rewritten, so finished folds
    stay finished."""
    if cfg.data is None and not (data_dir / SYNTHETIC_MARKER).is_file():
        generate(data_dir, replace(DEMO_SYNTH, seed=cfg.seed))
    result = index_folder(data_dir)
    for warning in result.warnings:
        logger.warning(warning)
    write_problems(result.problems, (out / "manifest.csv").with_suffix(".problems.csv"))
    rows = [r.with_split("train") if r.label else r for r in result.rows]
    folds = default_folds(rows, most=cfg.folds or MOST_FOLDS)
    if cfg.folds and folds < cfg.folds:
        logger.warning("cross-fitting in %d folds, not %d: every fold needs a donor of each class", folds, cfg.folds)
    assignment = subject_folds(rows, folds, seed=cfg.seed)
    for path, manifest_rows in [(out / "manifest.csv", rows), *((out / "folds" / f"fold{k}.csv",
                                                                 fold_splits(rows, assignment, k))
                                                                for k in range(folds))]:
        if not path.is_file() or read_manifest(path) != manifest_rows:  # a rerun leaves finished folds' inputs be
            write_manifest(manifest_rows, path)
    logger.info("cross-fitting: %d donors in %d folds (%s)", len(assignment), folds,
                "; ".join(f"fold {k}: " + ", ".join(sorted(s for s, f in assignment.items() if f == k))
                          for k in range(folds)))
    return folds


def _exports(cfg: PipelineConfig) -> bool:
    """Whether the run ends with the ONNX export: when asked, or by default for the paper profile where the
    ``onnx`` extra is installed."""
    if cfg.export:
        return True  # the extra was checked before training
    if cfg.export is None and cfg.profile is Profile.paper:
        if has_extra("onnx"):
            return True
        logger.warning("no ONNX export: it needs alldetect's 'onnx' extra (pip install 'alldetect[onnx]')")
    return False


def _export(folder: EnsembleFolder) -> None:
    result = export_ensemble(folder)
    logger.info("wrote %s; %s", result.fp32, result.describe_int8())


def _explain_examples(folder: EnsembleFolder, device: str) -> None:
    """A Grad-CAM grid of the first test cells of each class (Figs. 6-8 of the paper)."""
    from .inference.explain import explain_files

    preds = read_predictions(folder.predictions(folder.report_split))[folder.spec.default_method]
    chosen = [p for label in (1, 0) for p in [q for q, y in zip(preds.path, preds.y) if y == label][:GRID_CELLS // 2]]
    explain_files(folder, chosen, folder.path / folder.GRADCAM, device=device)


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
