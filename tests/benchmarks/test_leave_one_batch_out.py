"""The leave-one-batch-out yardstick on synthetic cells of four batches (the challenge's three training folds
and its preliminary test set): every batch held out once, trained through `alldetect run`, pooled with
intervals. Synthetic, so the figures say nothing; the test checks the machinery."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import alldetect
from alldetect.data.synth import SynthConfig, generate
from alldetect.evaluation.operating_point import fit_operating_point
from alldetect.formats.predictions import read_predictions

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "leave_one_batch_out.py"


def test_every_batch_is_held_out_once_and_trained_without(tmp_path):
    _synthetic_batches(tmp_path)
    out = tmp_path / "lobo"
    done = _lobo(tmp_path, out, "--operating-point", "sensitivity:0.9")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "leave_one_batch_out.json").read_text())
    turns = ["fold_0", "fold_1", "fold_2", "prelim", "**pooled**"]
    assert [(r["recipe"], r["held out"]) for r in result["table"]] == (
        [("baseline", t) for t in turns] + [("baseline @ sensitivity 0.9", t) for t in turns])
    assert result["table"][4]["cells"] == sum(r["cells"] for r in result["table"][:4]) == 42
    for batch in ("fold_0", "fold_1", "fold_2", "prelim"):
        manifest = (out / "baseline" / f"without-{batch}" / "run" / "manifest.csv").read_text()
        assert f"/{batch}/" not in manifest and manifest.count("\n") > 1  # trained on the other batches only
        scored = result["scored"][f"baseline|{batch}"]
        assert scored["paths"] and all(f"/{batch}/" in p or batch == "prelim" for p in scored["paths"])
        # refitted on the out-of-fold predictions of the combiner that scored, as `run --operating-point` fits
        ensemble = alldetect.load(out / "baseline" / f"without-{batch}" / "run" / "ensemble", engine="torch")
        val = read_predictions(ensemble.folder.predictions("val"))[ensemble.method]
        fitted = fit_operating_point(val.y, val.prob_all, val.subject, criterion="sensitivity", target=0.9)
        refitted = scored["refitted"]["baseline @ sensitivity 0.9"]
        assert (refitted["cell_threshold"], refitted["criterion"]) == (fitted.cell_threshold, "sensitivity")
        assert scored["point"]["criterion"] == "balanced_accuracy"


@pytest.mark.slow
def test_chosen_batches_are_held_out_alone_or_together_and_pooled_over_them(tmp_path):
    _synthetic_batches(tmp_path)
    out = tmp_path / "lobo"
    done = _lobo(tmp_path, out, "--hold-out", "prelim")
    assert done.returncode == 0, done.stderr[-2000:]
    alone = json.loads((out / "leave_one_batch_out.json").read_text())["table"][0]

    # prelim's trained run reused (the same row); fold_0 and fold_2 held out by one ensemble trained on the rest
    done = _lobo(tmp_path, out, "--hold-out", "prelim", "--hold-out", "fold_0+fold_2")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["held out"]: r for r in json.loads((out / "leave_one_batch_out.json").read_text())["table"]}
    assert list(rows) == ["prelim", "fold_0+fold_2", "**pooled**"]
    assert rows["prelim"] == alone
    assert rows["**pooled**"]["cells"] == rows["prelim"]["cells"] + rows["fold_0+fold_2"]["cells"]
    manifest = (out / "baseline" / "without-fold_0+fold_2" / "run" / "manifest.csv").read_text()
    assert "/fold_0/" not in manifest and "/fold_2/" not in manifest and "/fold_1/" in manifest


def test_an_unknown_batch_or_one_held_out_twice_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    _synthetic_batches(tmp_path)
    for hold_out, error in ((["fold_9"], "--hold-out fold_9: no such batch"),
                            (["fold_0+fold_1", "fold_1"], "--hold-out names fold_1 more than once")):
        arguments = (arg for batch in hold_out for arg in ("--hold-out", batch))
        refused = _lobo_here(tmp_path, capsys, monkeypatch, *arguments)
        assert refused.returncode == 2 and error in refused.stderr.splitlines()[-1]
    for criterion, error in (("sens:0.9", "the criterion is one of balanced_accuracy, sensitivity, specificity"),
                             ("specificity", "specificity needs a target in (0, 1]")):
        refused = _lobo_here(tmp_path, capsys, monkeypatch, "--operating-point", criterion)
        assert refused.returncode == 2 and error in refused.stderr.splitlines()[-1]


def _lobo_here(tmp_path: Path, capsys, monkeypatch, *extra: str) -> subprocess.CompletedProcess:
    """The script's main in this process (refusals come before any training: no need to start Python anew)."""
    spec = importlib.util.spec_from_file_location("leave_one_batch_out", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *_arguments(tmp_path, tmp_path / "lobo"), *extra])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        script.main()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, exit_.value.code, out, err)


def _synthetic_batches(tmp_path: Path) -> None:
    generate(tmp_path / "data", SynthConfig(size=304, all_subjects=6, hem_subjects=6, test_all_subjects=1,
                                            test_hem_subjects=1, final_subjects=0, cells_per_subject=3), workers=2)


def _arguments(tmp_path: Path, out: Path) -> list[str]:
    return ["--data", str(tmp_path / "data"), "--members", "mobilenet,efficientnet_lite0", "--epochs", "1",
            "--input-size", "32", "--no-pretrained", "--folds", "2", "--bootstrap", "20", "--device", "cpu",
            "--out", str(out)]


def _lobo(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *_arguments(tmp_path, out), *extra], capture_output=True,
                          text=True, timeout=600)
