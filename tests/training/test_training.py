import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from alldetect.formats.manifest import read_manifest, write_manifest
from alldetect.formats.predictions import read_predictions
from alldetect.models import create_member
from alldetect.training import fit
from alldetect.training.checkpoint import CheckpointError, load_checkpoint
from alldetect.training.schedule import triangular2_lr
from helpers import tiny_config


def _csv(path):
    """Rows of a run's CSV without the wall-clock column (the one thing that differs between equal runs)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "train_img_s"} for row in csv.DictReader(f)]


def _weights(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_run(split_manifest, tmp_path_factory):
    cfg = tiny_config(split_manifest, tmp_path_factory.mktemp("run") / "mobilenet")
    return cfg, fit(cfg)


def test_run_directory_holds_everything(tiny_run):
    cfg, run = tiny_run
    for name in ("config.json", "history.csv", "epochs.csv", "metrics.json", "predictions_val.csv",
                 "predictions_test.csv", "problems.csv", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["seed"] == 0 and saved["config"]["member"] == "mobilenet" and "torch" in saved["versions"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["select_metric"] == "ba" and {"val", "test"} <= set(metrics)
    assert [list(r) for r in _csv(run / "history.csv")][0] == ["step", "epoch", "lr", "loss"]


def test_oversampling_and_the_clr_schedule_per_step(tiny_run, split_manifest):
    cfg, run = tiny_run
    train = [r for r in read_manifest(split_manifest) if r.split == "train"]
    majority = max(sum(r.label == "all" for r in train), sum(r.label == "hem" for r in train))
    steps_per_epoch = math.ceil(2 * majority / cfg.batch_size)  # oversampled to twice the majority
    history = _csv(run / "history.csv")
    assert [int(r["step"]) for r in history] == list(range(cfg.epochs * steps_per_epoch))
    for r in history:
        expected = triangular2_lr(int(r["step"]), low=cfg.clr_low, high=cfg.clr_high,
                                  half_cycle=cfg.clr_step_epochs * steps_per_epoch)
        assert float(r["lr"]) == pytest.approx(expected, rel=1e-9)
        assert int(r["epoch"]) == int(r["step"]) // steps_per_epoch


def test_adamax_betas_stay_fixed(tiny_run):
    _, run = tiny_run
    groups = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in groups)


def test_predictions_follow_the_contract_and_restore_the_two_class_head(tiny_run, split_manifest):
    cfg, run = tiny_run
    preds = read_predictions(run / "predictions_val.csv")["mobilenet"]
    val = [r for r in read_manifest(split_manifest) if r.split == "val"]
    assert preds.path == [r.path for r in val] and preds.subject == [r.subject for r in val]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    model = create_member("mobilenet")
    model.load_state_dict(best["model"])  # strict: the 2-class head comes back too
    from alldetect.data.cache import load_crops
    from alldetect.models.runtime import predict_probs

    crops = load_crops(preds.path, cfg.preprocess, cache_dir=split_manifest.parent / ".alldetect-cache")
    np.testing.assert_allclose(predict_probs(model, crops.images), preds.prob_all, atol=1e-6)


def test_test_split_never_influences_training_or_selection(tiny_run, split_manifest, tmp_path):
    cfg, run = tiny_run
    flipped = [r if r.split != "test" else r.__class__(**{**r.__dict__, "label": "hem" if r.label == "all" else "all"})
               for r in read_manifest(split_manifest)]
    manifest = split_manifest.parent / "flipped-test.csv"
    write_manifest(flipped, manifest)
    other = fit(tiny_config(manifest, tmp_path / "other"))
    assert _csv(other / "history.csv") == _csv(run / "history.csv")
    assert _csv(other / "epochs.csv") == _csv(run / "epochs.csv")
    assert _same_weights(_weights(other / "checkpoints" / "best.pt"), _weights(run / "checkpoints" / "best.pt"))


@pytest.mark.parametrize("options", [["--augment-on", "loader"], ["--augment-on", "device"], ["--ema-decay", "0.9"],
                                     ["--sampling", "donors"]])
def test_resume_after_sigkill_is_exact(split_manifest, tmp_path, options):
    """The whole run and the resume run in this process (the same command line); the killed one is a real
    process."""
    from typer.testing import CliRunner

    from alldetect.cli import app

    def arguments(out):
        return ["train", str(split_manifest), "--member", "mobilenet", "--out", str(out), "--crop", "64", "--epochs",
                "3", "--batch-size", "8", "--no-pretrained", "--device", "cpu", "--workers", "0",
                "--checkpoint-every", "2", "--seed", "0", *options]

    whole, out = tmp_path / "whole", tmp_path / "killed"
    done = CliRunner().invoke(app, arguments(whole))
    assert done.exit_code == 0, done.output
    proc = subprocess.Popen([sys.executable, "-m", "alldetect.cli", *arguments(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["step"]
    total = len(_csv(whole / "history.csv"))
    assert 0 < killed_at < total, "the kill must land mid-run"
    assert not (out / "metrics.json").exists()
    done = CliRunner().invoke(app, [*arguments(out), "--resume"])
    assert done.exit_code == 0, done.output
    assert _same_weights(_weights(out / "checkpoints" / "last.pt"), _weights(whole / "checkpoints" / "last.pt"))
    assert _same_weights(_weights(out / "checkpoints" / "best.pt"), _weights(whole / "checkpoints" / "best.pt"))
    assert _csv(out / "history.csv") == _csv(whole / "history.csv")
    assert _csv(out / "epochs.csv") == _csv(whole / "epochs.csv")
    assert json.loads((out / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "alldetect-checkpoint", "model": _RunsCode()}, f)
    torch.save({"format": "alldetect-checkpoint", "model": _RunsCode()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="refused: the file holds Python objects that could run code") as e:
        load_checkpoint(tmp_path / "evil2.pt")
    assert "\x1b[" not in str(e.value), "terminal colour codes in a message that may go to a file"
    with pytest.raises(CheckpointError, match="evil.pt: (refused|not a readable checkpoint)"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_fine_tuning_starts_from_the_offline_imagenet_weights(split_manifest, tmp_path):
    cfg = tiny_config(split_manifest, tmp_path / "lite0", member="efficientnet_lite0", pretrained=True, epochs=1,
                      clr_low=0.0, clr_high=0.0)  # lr 0: the weights can only be what training started from
    run = fit(cfg)
    imagenet = create_member("efficientnet_lite0", pretrained=True).state_dict()
    trained = _weights(run / "checkpoints" / "last.pt")
    assert torch.equal(trained["net.conv_stem.weight"], imagenet["net.conv_stem.weight"])
    assert torch.equal(trained["net.blocks.6.0.conv_pw.weight"], imagenet["net.blocks.6.0.conv_pw.weight"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(split_manifest, tmp_path):
    common = ["train", str(split_manifest), "--member", "vgg16", "--crop", "64", "--epochs", "1",
              "--no-pretrained", "--device", "cpu", "--workers", "0", "--seed", "0"]
    single = subprocess.run([sys.executable, "-m", "alldetect.cli", *common, "--batch-size", "8",
                             "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "alldetect.cli", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = _weights(tmp_path / "one" / "checkpoints" / "last.pt")
    two = _weights(tmp_path / "two" / "checkpoints" / "last.pt")
    # Gradients agree to float summation order; Adamax turns a near-zero gradient's noise into a step of up
    # to the learning rate, so some weights (0.6% with the CPU build of torch 2.13) may differ by at most the
    # largest lr used. A DDP that does not average gradients moves nearly every weight.
    max_lr = max(float(r["lr"]) for r in _csv(tmp_path / "one" / "history.csv"))
    differing = total = 0
    for k in one:
        diff = (two[k].double() - one[k].double()).abs()
        assert diff.max() <= 2 * max_lr + 1e-6, k
        differing += int((diff > 1e-5 + 1e-3 * one[k].double().abs()).sum())
        total += diff.numel()
    assert differing / total < 0.02, f"{differing} of {total} weights differ"
    assert [r["step"] for r in _csv(tmp_path / "one" / "history.csv")] == \
        [r["step"] for r in _csv(tmp_path / "two" / "history.csv")]


def test_dataloader_workers_do_not_change_the_result(split_manifest, tmp_path):
    """Augmentation is seeded per sample, so worker processes see exactly what the main process would."""
    runs = [fit(tiny_config(split_manifest, tmp_path / f"w{w}", epochs=1, workers=w)) for w in (0, 2)]
    assert _csv(runs[0] / "history.csv") == _csv(runs[1] / "history.csv")
    assert _same_weights(_weights(runs[0] / "checkpoints" / "last.pt"), _weights(runs[1] / "checkpoints" / "last.pt"))


_HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("augment", ["paper", "dihedral", "dihedral+stain"])
def test_a_step_reads_nothing_back_from_the_device(split_manifest, tmp_path, monkeypatch, augment):
    """On a GPU each of these would wait for the device: between two steps of one epoch the shipped loop (batches
    held whole and augmented as a batch, as on CUDA) calls none of them on a tensor. Counted on the CPU through the
    same code path."""
    from dataclasses import replace

    reads: list[str] = []
    counting = {"on": False}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            # torch's optimizers keep their step counters on the host by design: reading them waits for nothing
            if counting["on"] and "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    per_step: dict[int, list[str]] = {}
    steps_per_epoch = {}

    def on_step(step):
        per_step[step] = list(reads)
        reads.clear()
        counting["on"] = True

    cfg = replace(tiny_config(split_manifest, tmp_path / "run"), augment=augment, augment_on="device", epochs=2)
    fit(cfg, on_step=on_step)
    history = _csv(tmp_path / "run" / "history.csv")
    for row in history:
        steps_per_epoch.setdefault(row["epoch"], []).append(int(row["step"]) + 1)
    inside = [s for steps in steps_per_epoch.values() for s in steps[1:]]  # each epoch's first step follows its end
    assert len(inside) >= 4
    assert {s: per_step[s] for s in inside if per_step[s]} == {}


def test_donor_balanced_sampling_weighs_every_donor_alike_and_draws_afresh_each_epoch():
    from alldetect.data.dataset import DonorBalanced

    labels = np.array([1] * 100 + [1] * 10 + [1] * 3 + [0] * 40 + [0] * 2)
    subjects = ["A"] * 100 + ["B"] * 10 + ["C"] * 3 + ["H1"] * 40 + ["H2"] * 2
    draw = DonorBalanced(labels, subjects, seed=0)
    first, second = draw(0), draw(1)
    assert len(first) == len(draw) == 2 * 113  # each class as large as the majority, as oversampling makes it
    counts = {s: sum(subjects[i] == s for i in first) for s in ("A", "B", "C", "H1", "H2")}
    assert sorted(counts[s] for s in "ABC") in ([37, 38, 38], [37, 37, 38]) and {counts["H1"], counts["H2"]} <= {56, 57}
    assert sum(labels[first]) == 113
    a_cells = [i for i in first if subjects[i] == "A"]
    assert len(set(a_cells)) == len(a_cells)  # a donor with enough cells repeats none
    assert not np.array_equal(first, second) and np.array_equal(draw(0), first)


def test_batch_balanced_sampling_weighs_every_batch_alike_then_its_donors():
    from alldetect.data.dataset import DonorBalanced

    labels = np.array([1] * 100 + [1] * 10 + [1] * 3 + [0] * 40 + [0] * 2)
    subjects = ["A"] * 100 + ["B"] * 10 + ["C"] * 3 + ["H1"] * 40 + ["H2"] * 2
    batches = ["fold_1"] * 110 + ["fold_0"] * 3 + ["fold_1"] * 42
    draw = DonorBalanced(labels, subjects, seed=0, batches=batches)
    first = draw(0)
    assert len(first) == 2 * 113
    counts = {s: sum(subjects[i] == s for i in first) for s in ("A", "B", "C", "H1", "H2")}
    assert counts["C"] in (56, 57) and counts["A"] + counts["B"] == 113 - counts["C"]  # its batch's half, alone
    assert abs(counts["A"] - counts["B"]) <= 1
    assert {counts["H1"], counts["H2"]} <= {56, 57}  # one batch: as donor-balanced
