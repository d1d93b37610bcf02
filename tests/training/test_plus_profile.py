"""The plus profile and its parts: validated config, fine-tuning schedule, dihedral augmentation, selection."""

import csv
import math

import numpy as np
import pytest
import torch

from alldetect.data.transforms import augmentation, dihedral_augmentation
from alldetect.errors import AlldetectError
from alldetect.training import fit, profile_config
from alldetect.training.config import Profile, TrainConfig
from alldetect.training.loop import augments_on_device
from alldetect.training.schedule import warmup_cosine_lr

from helpers import tiny_config


def test_plus_is_the_paper_with_fine_tuning_levers_and_the_paper_stays_the_paper():
    paper, plus = profile_config("paper"), profile_config(Profile.plus)
    assert (paper.optimizer, paper.schedule, paper.augment, paper.select_metric) == \
        ("adamax", "triangular2", "paper", "ba")
    assert (paper.lr, paper.clr_high, paper.epochs, paper.label_smoothing) == (2e-4, 2e-3, 12, 0.0)
    assert (plus.optimizer, plus.schedule, plus.augment, plus.select_metric) == \
        ("adamw", "cosine", "dihedral", "last")
    assert plus.lr < paper.clr_high and plus.pretrained and plus.crop == paper.crop == 300
    assert (paper.sampling, paper.colour, plus.sampling, plus.colour) == ("cells", "imagenet", "donors", "centre")
    assert profile_config("plus", epochs=3, lr=None).epochs == 3  # None keeps the profile's value
    assert profile_config("plus", lr=None).lr == plus.lr


@pytest.mark.parametrize("field, value, message", [
    ("select_metric", "bal_acc", "unknown select_metric 'bal_acc'; choose one of ba, auc"),
    ("precision", "fp16", "unknown precision 'fp16'"),
    ("member", "resnet9", "unknown member 'resnet9'"),
    ("augment", "heavy", "unknown augment 'heavy'"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\), got 1.0"),
])
def test_bad_config_values_fail_at_construction_in_one_line(field, value, message):
    with pytest.raises(AlldetectError, match=message) as caught:
        TrainConfig(**{field: value})
    assert "\n" not in str(caught.value)


def test_a_host_augmentation_cannot_be_asked_to_run_on_the_device():
    with pytest.raises(AlldetectError, match="dihedral[+]hestain runs one image at a time .* auto or loader"):
        TrainConfig(augment="dihedral+hestain", augment_on="device")
    auto = TrainConfig(augment="dihedral+hestain", augment_on="auto")
    assert not augments_on_device(auto, torch.device("cuda"))  # the loader's workers do it on a GPU machine
    assert augments_on_device(TrainConfig(augment="dihedral+stain"), torch.device("cuda"))
    assert not augments_on_device(TrainConfig(augment="dihedral+stain"), torch.device("cpu"))


def test_bad_config_fails_before_any_data_is_read(tmp_path):
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(AlldetectError, match="unknown select_metric"):
        fit(profile_config("plus", manifest=str(missing), select_metric="val_los"))
    with pytest.raises(AlldetectError, match="unknown profile 'fast'; known: demo, paper, plus"):
        profile_config("fast")


def test_warmup_then_cosine_reaches_the_peak_and_ends_near_zero():
    lrs = [warmup_cosine_lr(s, peak=3e-4, warmup_steps=10, total_steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(3e-5) and lrs[9] == pytest.approx(3e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    rotations = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(-1,)) for r in rotations]


def test_dihedral_augmentation_draws_each_of_the_eight_symmetries_without_resampling():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)
    views = _dihedral(x)
    counts = np.zeros(8, int)
    transform = dihedral_augmentation()
    for _ in range(800):
        out = transform(x)
        assert out.dtype == torch.uint8
        matches = [k for k, v in enumerate(views) if torch.equal(out, v)]
        assert len(matches) == 1, "every output is exactly one symmetry of the input"
        counts[matches[0]] += 1
    assert counts.min() > 60, counts  # uniform: 100 expected each
    assert augmentation("none") is None


def _epochs(run) -> list[dict]:
    with open(run / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("metric", ["val_loss", "last"])
def test_selection_keeps_the_epoch_it_claims(split_manifest, tmp_path, metric):
    cfg = tiny_config(split_manifest, tmp_path / metric, epochs=3, select_metric=metric, optimizer="adamw",
                      schedule="cosine", warmup_epochs=1.0, lr=3e-3, label_smoothing=0.1, augment="dihedral")
    run = fit(cfg)
    epochs = _epochs(run)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    if metric == "last":
        assert best == len(epochs) - 1
    else:
        losses = [float(e["val_loss"]) for e in epochs]
        assert best == int(np.argmin(losses)), "val_loss selection keeps the lowest loss, not the highest"
    with open(run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    steps_per_epoch = len(history) // 3
    for row in history:
        expected = warmup_cosine_lr(int(row["step"]), peak=3e-3, warmup_steps=steps_per_epoch,
                                    total_steps=3 * steps_per_epoch)
        assert math.isclose(float(row["lr"]), expected, rel_tol=1e-6)


def test_the_moving_average_is_what_is_validated_and_kept(split_manifest, tmp_path):
    run = fit(tiny_config(split_manifest, tmp_path / "ema", epochs=2, select_metric="last", ema_decay=0.9))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    kept = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    assert all(torch.equal(kept[k], averaged[k]) for k in kept)
    assert any(not torch.equal(kept[k], last["model"][k]) for k in kept if kept[k].is_floating_point())
