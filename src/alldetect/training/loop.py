"""``fit(cfg)``: the training protocol, readable top to bottom.

The paper's: Adamax + triangular2 cyclic lr, cross-entropy, oversampled and augmented 300 px center crops;
the best epoch on the validation split (``cfg.select_metric``) is kept and scores val and test. The ``plus``
profile swaps in AdamW + warm-up/cosine, label smoothing, dihedral augmentation and keeps the last epoch.
Every step can be resumed exactly: model, optimizer, step and RNG live in the checkpoint, and batches and
augmentation are functions of (seed, epoch, step).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..choices import HOST_AUGMENTATIONS, Sampling
from ..data.dataset import DonorBalanced, oversample_indices
from ..data.split import check_subject_disjoint
from ..data.transforms import batch_augmentation
from ..errors import AlldetectError
from ..evaluation.metrics import METRIC_NAMES, classification_metrics, log_loss
from ..formats.manifest import read_manifest
from ..models import create_member
from ..precision import training_autocast
from ..models.runtime import predict_probs, resolve_device
from .checkpoint import load_checkpoint, restore_rng
from .config import SELECTION, TrainConfig, resumed_config
from .batches import LoaderBatches, ResidentBatches
from .split_images import SplitImages, load_split
from .distributed import DistInfo, barrier, init_distributed, shutdown
from .run_dir import Best, RunDir, StepRecord
from .sampler import EpochBatches
from .schedule import learning_rate_schedule

logger = logging.getLogger(__name__)
EPOCH_COLUMNS = ("epoch", "step", "val_loss", *METRIC_NAMES, "selected", "train_img_s")


@dataclass
class Training:
    """One member's training in progress: what ``fit`` sets up, and where it stands (``step``, ``best``)."""
    cfg: TrainConfig
    device: torch.device
    dist: DistInfo
    run: RunDir
    train: SplitImages
    val: SplitImages | None
    test: SplitImages | None
    model: nn.Module      # the trained weights
    net: nn.Module        # what the steps call: ``model``, compiled and/or wrapped for several processes
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    batches: EpochBatches
    source: ResidentBatches | LoaderBatches
    step: int = 0
    best: Best = field(default_factory=Best)
    pending: list[StepRecord] = field(default_factory=list)  # history rows not yet written

    @property
    def kept(self) -> nn.Module:
        """The weights that are validated, selected and scored: the moving average when there is one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def total_steps(self) -> int:
        return self.batches.steps_per_epoch * self.cfg.epochs


def fit(cfg: TrainConfig, *, resume: bool = False, on_step: Callable[[int], None] | None = None) -> Path:
    """Train one member; returns the run directory. ``resume`` continues from ``<run>/checkpoints/last.pt``.
    ``on_step(step)`` is called after every optimizer step (a profiler's or a test's hook)."""
    training = _set_up(cfg, resume=resume)
    progress = tqdm(total=training.total_steps, initial=training.step, desc=f"train {training.cfg.member}",
                    unit="step", disable=None if training.dist.is_main else True, dynamic_ncols=True)
    while training.step < training.total_steps:
        epoch = training.step // training.batches.steps_per_epoch
        train_img_s = _train_epoch(training, epoch, progress, on_step)
        _validate_and_keep(training, epoch, train_img_s)
    progress.close()
    if training.dist.is_main:
        _finish(training.run, training.cfg, training.device, training.val, training.test)
    barrier(training.dist)
    shutdown(training.dist)
    return training.run.path


def _set_up(cfg: TrainConfig, *, resume: bool) -> Training:
    """The device, the run folder (and the checkpoint to resume from), the data, the model and its optimizer."""
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    run = RunDir(cfg.out, writes=dist.is_main)
    state = run.resume_state() if resume else None
    if state is not None:
        cfg = resumed_config(cfg, state["config"])
    elif resume:
        logger.info("no checkpoint at %s: starting from scratch", run.last)
    torch.manual_seed(cfg.seed)

    rows = read_manifest(cfg.manifest)
    check_subject_disjoint(rows)
    cache_dir = cfg.cache_dir or Path(cfg.manifest).resolve().parent / ".alldetect-cache"
    load = dict(preprocess=cfg.preprocess, cache_dir=cache_dir)
    # keeping the last epoch needs no validation: such a run may train on every donor (a refit)
    train = load_split(rows, "train", **load)
    val = load_split(rows, "val", required=SELECTION[cfg.select_metric] != "last", **load)
    test = load_split(rows, "test", required=False, **load)
    if len(set(train.labels.tolist())) < 2:
        raise AlldetectError("the training split holds one class only; both all and hem are needed")

    model = create_member(cfg.member, pretrained=cfg.pretrained and state is None, weights=cfg.weights
                          if state is None else None, colour=cfg.colour).to(device)
    if dist.world_size > 1 and device.type == "cuda":  # batch statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model, device)
    ema = _moving_average(model, cfg.ema_decay)
    if cfg.sampling in (Sampling.donors, Sampling.batches):
        indices = DonorBalanced(train.labels, [r.subject for r in train.rows], seed=cfg.seed,
                                batches=[r.source for r in train.rows] if cfg.sampling == Sampling.batches else None)
    else:
        indices = oversample_indices(train.labels, seed=cfg.seed) if cfg.oversample else np.arange(len(train.rows))
    batches = EpochBatches(indices, batch_size=cfg.batch_size, seed=cfg.seed, world_size=dist.world_size,
                           rank=dist.rank)
    source = (ResidentBatches(train, batches, device, batch_augmentation(cfg.augment), seed=cfg.seed)
              if augments_on_device(cfg, device)
              else LoaderBatches(train, batches, device, cfg.augment, workers=_workers(cfg, device), seed=cfg.seed))

    step, best = 0, Best()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], Best(**state["best"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        logger.info("resuming %s at step %d of %d", run.path, step, batches.steps_per_epoch * cfg.epochs)
    run.start(cfg, step, fresh=state is None,
              problems=[p for split in (train, val, test) if split is not None for p in split.problems])
    net: nn.Module = torch.compile(model) if cfg.compile else model
    if dist.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return Training(cfg, device, dist, run, train, val, test, model, net, ema, optimizer, batches, source, step,
                    best)


def augments_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training crops stay on ``device`` and each batch is augmented there (``TrainConfig.augment_on``):
    asked for, or ``auto`` on a GPU unless the augmentation only runs on the host."""
    return cfg.augment_on == "device" or (cfg.augment_on == "auto" and device.type == "cuda"
                                          and cfg.augment not in HOST_AUGMENTATIONS)


def _train_epoch(t: Training, epoch: int, progress: tqdm, on_step: Callable[[int], None] | None) -> float:
    """The steps of ``epoch`` from where ``t`` stands; returns the training images/s. Nothing in a step reads a
    device value back to the host: the loss stays on the device until the epoch's history is written."""
    cfg, device = t.cfg, t.device
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    lr_at = learning_rate_schedule(cfg, t.batches.steps_per_epoch)
    first = t.step - epoch * t.batches.steps_per_epoch
    t.net.train()
    started, images_seen = time.perf_counter(), 0
    for images, labels in t.source.epoch(epoch, start_step=first):
        lr = lr_at(t.step)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with training_autocast(device, cfg.precision):
            loss = loss_fn(t.net(images).float(), labels)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        if t.ema is not None:
            t.ema.update(t.model, step=t.step + 1)  # the first update copies the weights
        t.pending.append(StepRecord(t.step, epoch, lr, loss.detach()))
        t.step += 1
        images_seen += len(labels) * t.dist.world_size
        progress.update(1)
        if on_step is not None:
            on_step(t.step)
        if cfg.checkpoint_every and t.step % cfg.checkpoint_every == 0 and t.step % t.batches.steps_per_epoch:
            t.run.save_last(t.model, t.optimizer, cfg, t.step, t.best, t.pending, ema=t.ema)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_img_s = images_seen / max(time.perf_counter() - started, 1e-9)
    progress.set_postfix(img_s=f"{train_img_s:.1f}", lr=f"{t.optimizer.param_groups[0]['lr']:.2e}")
    return train_img_s


def _validate_and_keep(t: Training, epoch: int, train_img_s: float) -> None:
    """Score the validation split, keep the epoch if it is the best so far, log it and checkpoint."""
    cfg = t.cfg
    scores = {} if t.val is None else _scores(t.val.labels, predict_probs(
        t.kept, t.val.images, t.val.positions, batch_size=cfg.batch_size * 2, device=t.device,
        precision=cfg.precision))
    score = _selection_score(cfg.select_metric, scores, epoch)
    selected = score > t.best.score
    if selected:
        t.best = Best(epoch, score)
        t.run.save_best(t.kept, cfg, epoch, t.step)
    t.run.log_epoch(EPOCH_COLUMNS, {"epoch": epoch, "step": t.step, **scores, "selected": int(selected),
                                    "train_img_s": f"{train_img_s:.2f}"})
    if scores:
        logger.info("epoch %d: val loss %.4f, ba %.4f, auc %.4f; kept epoch %d (%s)", epoch, scores["val_loss"],
                    scores["ba"], scores["auc"], t.best.epoch, cfg.select_metric)
    t.run.save_last(t.model, t.optimizer, cfg, t.step, t.best, t.pending, ema=t.ema)


def _scores(labels: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    return {"val_loss": log_loss(labels, prob), **classification_metrics(labels, prob)}


def _selection_score(metric: str, scores: dict[str, float], epoch: int) -> float:
    """Higher is better: the metric itself, its negative for losses, the epoch for "last"."""
    direction = SELECTION[metric]
    if direction == "last":
        return float(epoch)
    score = scores[metric]
    if math.isnan(score):
        return -math.inf
    return score if direction == "max" else -score


def _moving_average(model: nn.Module, decay: float) -> nn.Module | None:
    """An exponential moving average of ``model``'s weights (timm's ``ModelEmaV3``), or None when ``decay`` is 0."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3  # after the members' import, which lets torchvision load beside torch

    return ModelEmaV3(model, decay=decay)


def _optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Adamax as in the paper; AdamW with decoupled weight decay, none on biases and normalisation layers. On CUDA
    both update every tensor at once (torch's multi-tensor Adamax, its fused AdamW kernel); on a CPU, tensor by
    tensor as before."""
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=cfg.clr_low, betas=cfg.betas, eps=cfg.eps)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=True if device.type == "cuda" else None)


def _finish(run: RunDir, cfg: TrainConfig, device: torch.device, val: SplitImages | None,
            test: SplitImages | None) -> None:
    """Score val and test with the selected checkpoint; write predictions and metrics."""
    best = load_checkpoint(run.best)
    model = create_member(cfg.member, pretrained=False, colour=cfg.colour).to(device)
    model.load_state_dict(best["model"])
    metrics = {"member": cfg.member, "select_metric": cfg.select_metric, "best_epoch": best["epoch"]}
    for name, split in (("val", val), ("test", test)):
        if split is None:
            continue
        prob = predict_probs(model, split.images, split.positions, batch_size=cfg.batch_size * 2, device=device,
                             precision=cfg.precision)
        run.write_scores(name, split.rows, prob, cfg.member)
        metrics[name] = classification_metrics(split.labels, prob)
    run.write_metrics(metrics)


def _workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
