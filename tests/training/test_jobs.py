"""Trainings as jobs of submitit: local processes for real, SLURM through submitit's own mocked cluster."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alldetect import pipeline
from alldetect.cli import app
from alldetect.errors import AlldetectError
from alldetect.pipeline import Stage, Stages
from alldetect.training import jobs
from alldetect.training.jobs import JobSettings, Training, run_jobs

from helpers import tiny_config

submitit = pytest.importorskip("submitit")


def test_local_jobs_train_what_fit_trains_and_a_failure_is_one_line_with_its_log(split_manifest, tmp_path):
    good = Training("train mobilenet", tiny_config(split_manifest, tmp_path / "good", epochs=1))
    bad = Training("train broken", tiny_config(tmp_path / "missing.csv", tmp_path / "bad", epochs=1))
    run_jobs([good, bad], JobSettings("local", jobs=2), tmp_path / "jobs")
    failures = [t.failure for t in (good, bad) if t.failure]
    assert (tmp_path / "good" / "metrics.json").is_file()
    assert len(failures) == 1 and failures[0].startswith("train broken: failed (")
    log = Path(failures[0].rsplit("log: ", 1)[1])
    assert log.is_file() and log.is_relative_to(tmp_path / "jobs")


def _fake_train(fail: set[str]):
    """Stands in for a training (the real one runs in the local test above): writes the finished marker."""
    def train(config, resume, afresh, threads):
        if Path(config.out).name in fail:
            raise RuntimeError("out of memory")
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "metrics.json").write_text("{}")
        return config.out
    return train


def _mocked_slurm_run(monkeypatch, root: Path, manifest: Path, names: list[str], settings: JobSettings,
                      fail: set[str]) -> tuple[list[Training], str]:
    """``pipeline._train_as_jobs`` against submitit's own mocked SLURM: instead of waiting, the cluster runs every
    array task submitted so far in this process and reports it COMPLETED or FAILED."""
    from submitit.core import submission
    from submitit.slurm.slurm import SlurmJob
    from submitit.slurm.test_slurm import mocked_slurm

    monkeypatch.setattr(jobs, "train_job", _fake_train(fail))
    seen: list[Training] = []
    real = pipeline.run_jobs
    monkeypatch.setattr(pipeline, "run_jobs", lambda trainings, *a: seen.extend(trainings) or real(trainings, *a))
    stages = [(Stage(f"train {n}", {}, [root / n / "metrics.json"], run=lambda status: None,
                     training=tiny_config(manifest, root / n)), f"key-{n}") for n in names]
    with mocked_slurm() as mock:
        states: dict[str, str] = {}

        def cluster(_seconds: float) -> None:
            for job in [t.job for t in seen if t.job is not None and t.job.job_id not in states]:
                with mock.job_context(job.job_id):
                    try:
                        submission.process_job(job.paths.folder)
                        states[job.job_id] = "COMPLETED"
                    except Exception:  # noqa: BLE001  (the task's error is in its result file)
                        states[job.job_id] = "FAILED"
                array = job.job_id.split("_")[0]
                mock.job_sacct[array] = "\n".join([mock.SACCT_HEADER] + [f"{j}|{s}" for j, s in states.items()
                                                                         if j.startswith(array + "_")])
            SlurmJob.watcher.clear()

        monkeypatch.setattr(jobs.time, "sleep", cluster)
        try:
            pipeline._train_as_jobs(stages, Stages(root / "stages.json", force=False), settings, root / "jobs")
            error = ""
        except AlldetectError as e:
            error = str(e)
    return seen, error


def _submission(folder: Path, training: Training) -> str:
    """The sbatch script of the array that ran ``training``."""
    array = training.job.job_id.split("_")[0]
    return next(folder.rglob(f"{array}_submission.sh")).read_text()


def test_slurm_runs_one_array_and_a_rerun_resubmits_only_the_failed_task(split_manifest, tmp_path, monkeypatch):
    settings = JobSettings("slurm", jobs=2, partition="gpu", time_min=90, gpus_per_job=1, sbatch=("account=lab",))
    names = ["a", "b", "c"]
    first, error = _mocked_slurm_run(monkeypatch, tmp_path, split_manifest, names, settings, fail={"b"})
    assert [t.name for t in first] == ["train a", "train b", "train c"]
    assert "1 of 3 training job(s) failed: train b: failed (RuntimeError: out of memory); log: " in error
    script = _submission(tmp_path / "jobs", first[0])
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --account=lab", "submitit.core._submit"):
        assert line in script, script
    record = json.loads((tmp_path / "stages.json").read_text())
    assert {n: record[f"train {n}"]["done"] for n in names} == {"a": True, "b": False, "c": True}

    again, error = _mocked_slurm_run(monkeypatch, tmp_path, split_manifest, names, settings, fail=set())
    assert [t.name for t in again] == ["train b"] and not error
    assert "--array" not in _submission(tmp_path / "jobs", again[0])  # one task: submitit sends a plain job


def test_slurm_without_sbatch_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), "--executor", "slurm"])
    assert result.exit_code == 1 and "no sbatch on this machine's PATH" in result.output
    assert not (tmp_path / "run" / "data").exists()
    assert os.environ["PATH"] == str(tmp_path)


def test_jobs_without_the_cluster_extra_name_it_in_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    with pytest.raises(AlldetectError, match=r"pip install 'alldetect\[cluster\]'"):
        JobSettings("local").check()
    JobSettings().check()  # in process: nothing to install
