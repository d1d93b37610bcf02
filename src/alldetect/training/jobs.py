"""The trainings of a run (members x folds, each independent) as jobs of submitit: local processes, at most N at
once (one GPU each on a GPU machine, the cores shared out on a CPU), or one SLURM job array. Each job calls the
same ``fit`` as a training in process; the caller waits with a progress bar, gets one line per failed job with
its log, and Ctrl-C cancels every job it submitted.

submitit (the ``cluster`` extra) is imported only here, and only when jobs are asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..choices import Executor
from ..errors import AlldetectError, first_line, require_extra
from .config import TrainConfig

logger = logging.getLogger(__name__)
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class JobSettings:
    """Where the trainings run. Every field is an option of `alldetect run`."""
    executor: str = Executor.none.value  # choices.Executor: none (in this process), local or slurm
    jobs: int | None = None              # most at once; None: one per visible GPU, else one (local), all (slurm)
    partition: str | None = None         # SLURM partition; None: the cluster's default
    time_min: int = 240                  # SLURM time limit of each training
    gpus_per_job: int = 1                # SLURM GPUs of each training (0 on a CPU partition)
    sbatch: tuple[str, ...] = ()         # more sbatch options, each KEY=VALUE (e.g. account=lab, qos=high)

    def __post_init__(self) -> None:
        Executor.checked(self.executor, "executor")
        if self.jobs is not None and self.jobs < 1:
            raise AlldetectError(f"--jobs must be at least 1, got {self.jobs}")
        if self.time_min < 1 or self.gpus_per_job < 0:
            raise AlldetectError("--slurm-time-min must be at least 1 and --slurm-gpus at least 0")
        for option in self.sbatch:
            if "=" not in option or option.startswith("-"):
                raise AlldetectError(f"--sbatch {option!r}: give KEY=VALUE, as sbatch's --KEY=VALUE without the "
                                     "dashes (e.g. account=lab)")

    def check(self) -> None:
        """Refuse, before any work, what cannot run here: submitit missing, or SLURM without ``sbatch``."""
        if self.executor == Executor.none:
            return
        require_extra("cluster", f"--executor {self.executor}")
        if self.executor == Executor.slurm and shutil.which("sbatch") is None:
            raise AlldetectError("--executor slurm: no sbatch on this machine's PATH; run on a SLURM login node, or "
                                 "use --executor local")


@dataclass
class Training:
    """One training to run as a job: its stage name, config, how to start (afresh or resuming), and once it ran,
    why it failed (None: it finished)."""
    name: str
    config: TrainConfig
    resume: bool = False
    afresh: bool = False   # its folder holds another config's files: removed first
    job: object = field(default=None, repr=False)
    failure: str | None = None

    @classmethod
    def at(cls, name: str, config: TrainConfig, status: str) -> Training:
        """The training of a stage of `alldetect run` in ``status`` (new, changed, started or done): a started one
        resumes; any other starts afresh, its folder (another config's, or stale files) removed."""
        return cls(name, config, resume=status == "started", afresh=status != "started" and Path(config.out).exists())


def train_job(config: TrainConfig, resume: bool, afresh: bool, threads: int | None) -> str:
    """The training of a stage, in process or as a job: ``fit``, with ``threads`` CPU threads (None: as set)."""
    import torch

    from .loop import fit

    if threads:
        torch.set_num_threads(threads)
    if afresh and Path(config.out).exists():
        shutil.rmtree(config.out)
    return str(fit(config, resume=resume))


def run_jobs(trainings: list[Training], settings: JobSettings, folder: Path) -> None:
    """Run ``trainings`` as jobs (logs under ``folder``); each failed one gets its ``failure``, a line naming its
    log."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    if settings.executor == Executor.slurm:
        _slurm(trainings, settings, folder, submitit)
    else:
        _local(trainings, settings, folder, submitit)


def _local(trainings: list[Training], settings: JobSettings, folder: Path, submitit) -> None:
    """At most ``jobs`` processes at once, each with its own GPU where there are GPUs, else its share of cores."""
    gpus = _visible_gpus()
    slots = settings.jobs or max(1, len(gpus))
    threads = None if gpus else max(1, (os.cpu_count() or 1) // slots)
    executor = submitit.LocalExecutor(folder=folder / "%j")
    executor.update_parameters(timeout_min=settings.time_min)
    pending, running, free = list(trainings), [], list(range(slots))
    with _progress(len(trainings), f"trainings ({slots} at once)") as bar:
        try:
            while pending or running:
                while pending and free:
                    training, slot = pending.pop(0), free.pop(0)
                    if gpus:
                        executor.update_parameters(visible_gpus=[gpus[slot % len(gpus)]], gpus_per_node=1)
                    training.job = executor.submit(train_job, training.config, training.resume, training.afresh,
                                                   threads)
                    running.append((training, slot))
                for item in [r for r in running if r[0].job.done()]:
                    running.remove(item)
                    free.append(item[1])
                    bar.finished(item[0])
                bar.show(len(running))
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            _cancel([t for t, _ in running])
            raise


def _slurm(trainings: list[Training], settings: JobSettings, folder: Path, submitit) -> None:
    """One job array, one task per training, at most ``jobs`` running at once."""
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    extra = dict(option.split("=", 1) for option in settings.sbatch)
    executor.update_parameters(time=settings.time_min, gpus_per_node=settings.gpus_per_job or None,
                               partition=settings.partition, array_parallelism=settings.jobs or len(trainings),
                               additional_parameters=extra, job_name="alldetect-train")
    jobs = executor.map_array(train_job, [t.config for t in trainings], [t.resume for t in trainings],
                              [t.afresh for t in trainings], [None] * len(trainings))
    for training, job in zip(trainings, jobs):
        training.job = job
    logger.info("submitted %d training(s) as SLURM array %s (logs in %s)", len(jobs), jobs[0].job_id.split("_")[0],
                folder)
    waiting = list(trainings)
    with _progress(len(trainings), "trainings (SLURM)") as bar:
        try:
            while waiting:
                for training in [t for t in waiting if t.job.done()]:
                    waiting.remove(training)
                    bar.finished(training)
                bar.show(sum(t.job.state == "RUNNING" for t in waiting))
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            _cancel(waiting)
            raise


class _progress:
    """A bar over the trainings: done, running and failed; one line per failure, naming the job's log."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="job", disable=None)
        self.failed = 0

    def __enter__(self) -> _progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def finished(self, training: Training) -> None:
        try:
            error = training.job.exception()
        except Exception as e:  # noqa: BLE001  (a job that left no result: killed, cancelled, timed out)
            error = e
        if error is not None:
            training.failure = f"{training.name}: failed ({_cause(error)}); log: {training.job.paths.stderr}"
            logger.error("%s", training.failure)
            self.failed += 1
        self.bar.update(1)

    def show(self, running: int) -> None:
        self.bar.set_postfix_str(f"running {running}, failed {self.failed}")


def _cause(error: BaseException) -> str:
    """What ended a job, in one line: submitit's error holds the job's traceback between two rules of dashes, and
    its last line says it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    trace = lines[rules[0] + 1:rules[1]] if len(rules) >= 2 else []
    return trace[-1][:160] if trace else first_line(error)


def _cancel(trainings: list[Training]) -> None:
    for training in trainings:
        if training.job is not None and not training.job.done():
            training.job.cancel(check=False)
    logger.warning("interrupted: cancelled %d job(s) this run submitted", len(trainings))


def _visible_gpus() -> list[int]:
    """The GPUs jobs may take, as the machine numbers them (a CUDA_VISIBLE_DEVICES of this process respected: each
    job gets one of those), without starting CUDA here."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if named and all(part.strip().isdigit() for part in named.split(",")):
        return [int(part) for part in named.split(",")][:torch.cuda.device_count()]
    return list(range(torch.cuda.device_count()))
