"""`alldetect run` end to end on a tiny synthetic set, its stage cache, and resume after a kill."""

import json
import subprocess
from dataclasses import replace

import pytest

from alldetect import pipeline
from alldetect.data.synth import SynthConfig
from alldetect.errors import AlldetectError
from alldetect.pipeline import PipelineConfig, run_pipeline

from helpers import history_steps, kill_when_written, run_command

TINY = SynthConfig(size=96, all_subjects=6, hem_subjects=3, test_all_subjects=2, test_hem_subjects=2,
                   final_subjects=1, cells_per_subject=4)


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(pipeline, "DEMO_SYNTH", TINY)
    monkeypatch.setattr(pipeline, "DEMO_CROP", 76)


def _cfg(out):
    return PipelineConfig(out=str(out), members=("mobilenet", "efficientnet_lite0"), epochs=1,
                          batch_size=8, bootstrap=50, device="cpu")


def test_run_end_to_end_then_reuses_every_stage(tiny_demo, tmp_path):
    report = run_pipeline(_cfg(tmp_path))
    text = report.read_text()
    assert text.startswith("**Data: SYNTHETIC") and "| WEN-kappa |" in text
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert all(s["done"] for s in stages.values()) and len(stages) == 7
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "stages.json"}

    run_pipeline(_cfg(tmp_path))
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before, "a rerun must not redo finished stages"

    run_pipeline(replace(_cfg(tmp_path), bootstrap=60))  # only the report's inputs changed
    assert (tmp_path / "members" / "mobilenet" / "metrics.json").stat().st_mtime_ns == \
        before[tmp_path / "members" / "mobilenet" / "metrics.json"]
    assert (tmp_path / "ensemble" / "report.md").stat().st_mtime_ns != before[tmp_path / "ensemble" / "report.md"]

    reported = (tmp_path / "ensemble" / "report.md").stat().st_mtime_ns
    run_pipeline(replace(_cfg(tmp_path), bootstrap=60, export=True))  # one more stage, nothing redone
    assert json.loads((tmp_path / "stages.json").read_text())["export"]["done"]
    assert (tmp_path / "ensemble" / "ensemble.int8.onnx").is_file()
    assert (tmp_path / "ensemble" / "report.md").stat().st_mtime_ns == reported


def test_killed_run_resumes_without_losing_finished_work(tmp_path):
    """A real `alldetect run` process, SIGKILLed while training its second member, then rerun."""
    command = run_command(TINY, 76, ["run", "--members", "mobilenet,efficientnet_lite0", "--epochs", "2",
                                     "--batch-size", "4", "--bootstrap", "50", "--device", "cpu"], tmp_path)
    kill_when_written(command, tmp_path / "members" / "efficientnet_lite0" / "checkpoints" / "last.pt")
    first_done = (tmp_path / "members" / "mobilenet" / "metrics.json").stat().st_mtime_ns
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["train efficientnet_lite0"]["done"] is False

    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "members" / "mobilenet" / "metrics.json").stat().st_mtime_ns == first_done
    steps = history_steps(tmp_path / "members" / "efficientnet_lite0")
    assert steps == list(range(len(steps)))  # resumed: no step lost, none repeated
    assert (tmp_path / "ensemble" / "report.md").is_file()


def test_real_data_on_a_cpu_gets_the_plus_profile_with_the_lite_members_and_says_so(tmp_path, caplog):
    from alldetect.models.members import LITE_MEMBERS
    from alldetect.pipeline import choose_recipe
    from alldetect.training.config import Profile

    with caplog.at_level("INFO"):
        chosen = choose_recipe(PipelineConfig(out=str(tmp_path), data=str(tmp_path), device="cpu"))
    assert (chosen.profile, chosen.members, chosen.input_size, chosen.folds) == (Profile.plus, LITE_MEMBERS, 96, 3)
    assert "without a GPU" in caplog.text and "--profile paper" in caplog.text
    asked = choose_recipe(PipelineConfig(out=str(tmp_path), data=str(tmp_path), device="cpu", profile=Profile.paper))
    assert (asked.profile, asked.members, asked.input_size) == (Profile.paper, pipeline.PAPER_MEMBERS, None)
    synthetic = choose_recipe(PipelineConfig(out=str(tmp_path), device="cpu"))
    assert synthetic.profile is Profile.demo and synthetic.members == pipeline.PAPER_MEMBERS


def test_a_training_field_added_later_leaves_runs_made_before_it_finished():
    """A run's stage is keyed by the fields that shape its result; one added later (``colour``) is left out at
    the value that does what runs made before it did, so an upgrade does not retrain finished members."""
    from alldetect.pipeline import _shaping
    from alldetect.training import profile_config

    config = profile_config("paper", member="mobilenet", manifest="m.csv")
    assert "colour" not in _shaping(config) and "sampling" in _shaping(config)
    assert _shaping(replace(config, colour="centre"))["colour"] == "centre"


def test_run_options_reach_every_member_and_none_keeps_the_profile_s_choice(tmp_path):
    from alldetect.pipeline import _train_config
    from alldetect.training.config import Profile

    def member(**options):
        cfg = PipelineConfig(out=str(tmp_path), data=str(tmp_path), profile=Profile.plus, **options)
        return _train_config(cfg, "efficientnet_lite0", tmp_path / "fold0.csv", "fold0")

    chosen = member(augment="dihedral+hestain", colour="standardise", sampling="cells")
    assert (chosen.augment, chosen.colour, chosen.sampling) == ("dihedral+hestain", "standardise", "cells")
    assert (member().augment, member().colour, member().sampling) == ("dihedral", "centre", "donors")


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    with pipeline.output_lock(tmp_path):
        with pytest.raises(AlldetectError, match="another `alldetect run` is writing this folder"):
            run_pipeline(_cfg(tmp_path))
    assert not (tmp_path / "members").exists()


@pytest.mark.parametrize("kind", ["empty", "folder", "not json"])
def test_a_damaged_stage_record_is_one_line(tmp_path, kind):
    record = tmp_path / "stages.json"
    if kind == "folder":
        record.mkdir()
    else:
        record.write_text("" if kind == "empty" else "[1, 2")
    with pytest.raises(AlldetectError, match="stages.json: .*run with --force"):
        run_pipeline(_cfg(tmp_path))


def test_the_stage_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    stages = pipeline.Stages(tmp_path / "stages.json", force=False)
    stages.mark("a", "k1", done=True)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stages.mark("b", "k2", done=False)
    assert json.loads((tmp_path / "stages.json").read_text()) == {"a": {"key": "k1", "done": True}}


@pytest.mark.slow
def test_trainings_as_local_jobs_give_the_in_process_ensemble(tiny_demo, tmp_path):
    pytest.importorskip("submitit")
    from alldetect.formats.predictions import read_predictions

    in_process = run_pipeline(_cfg(tmp_path / "none")).parent
    as_jobs = run_pipeline(replace(_cfg(tmp_path / "local"), executor="local", jobs=1)).parent
    assert (tmp_path / "local" / "jobs").is_dir()
    a, b = (read_predictions(folder / "predictions_test.csv") for folder in (in_process, as_jobs))
    for method in a:
        assert max(abs(x - y) for x, y in zip(a[method].prob_all, b[method].prob_all)) <= 1e-6, method
