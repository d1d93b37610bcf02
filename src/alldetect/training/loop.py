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
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.dataset import CellDataset, oversample_indices
from ..data.split import check_subject_disjoint
from ..data.transforms import augmentation, batch_augmentation
from ..errors import AlldetectError
from ..evaluation.metrics import METRIC_NAMES, classification_metrics, log_loss
from ..formats.manifest import read_manifest
from ..models import create_member
from ..precision import training_autocast
from ..models.runtime import predict_probs, resolve_device
from .checkpoint import load_checkpoint, restore_rng
from .config import SELECTION, TrainConfig, resumed_config
from .split_images import SplitImages, load_split
from .distributed import barrier, init_distributed, shutdown
from .run_dir import Best, RunDir, StepRecord
from .sampler import EpochBatches
from .schedule import learning_rate_schedule

logger = logging.getLogger(__name__)
EPOCH_COLUMNS = ("epoch", "step", "val_loss", *METRIC_NAMES, "selected", "train_img_s")


def fit(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train one member; returns the run directory. ``resume`` continues from ``<run>/checkpoints/last.pt``."""
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    run = RunDir(cfg.out, writes=dist_info.is_main)
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
                          if state is None else None).to(device)
    if dist_info.world_size > 1 and device.type == "cuda":  # batch statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    ema = _moving_average(model, cfg.ema_decay)
    kept = ema.module if ema is not None else model  # the weights that are validated, selected and scored
    indices = oversample_indices(train.labels, seed=cfg.seed) if cfg.oversample else np.arange(len(train.rows))
    batches = EpochBatches(indices, batch_size=cfg.batch_size, seed=cfg.seed,
                           world_size=dist_info.world_size, rank=dist_info.rank)
    steps_per_epoch, total_steps = batches.steps_per_epoch, batches.steps_per_epoch * cfg.epochs
    lr_at = learning_rate_schedule(cfg, steps_per_epoch)

    step, best = 0, Best()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], Best(**state["best"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        logger.info("resuming %s at step %d of %d", run.path, step, total_steps)
    run.start(cfg, step, fresh=state is None,
              problems=[p for split in (train, val, test) if split is not None for p in split.problems])
    net: nn.Module = torch.compile(model) if cfg.compile else model
    if dist_info.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and device.type == "cuda")
    dataset = CellDataset(train.images, train.labels, None if on_device else augmentation(cfg.augment),
                          positions=train.positions)
    augment_batch = batch_augmentation(cfg.augment) if on_device else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    workers = _workers(cfg, device)
    pending: list[StepRecord] = []  # history rows not yet written

    progress = tqdm(total=total_steps, initial=step, desc=f"train {cfg.member}", unit="step",
                    disable=None if dist_info.is_main else True, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        loader = DataLoader(dataset, batch_sampler=batches.epoch(epoch, start_step=first), num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed))
        net.train()
        epoch_started, epoch_images = time.perf_counter(), 0
        for images, labels in loader:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            if augment_batch is not None:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(_step_seed(cfg.seed, step, dist_info.rank))
                    images = augment_batch(images)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with training_autocast(device, cfg.precision):
                loss = loss_fn(net(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model, step=step + 1)  # the first update copies the weights
            pending.append(StepRecord(step, epoch, lr, loss.detach()))
            step += 1
            seen += len(labels) * dist_info.world_size
            epoch_images += len(labels) * dist_info.world_size
            progress.update(1)
            progress.set_postfix(img_s=f"{seen / (time.perf_counter() - started):.1f}", lr=f"{lr:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                run.save_last(model, optimizer, cfg, step, best, pending, ema=ema)

        # end of epoch: validate, keep the best, checkpoint
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_img_s = epoch_images / max(time.perf_counter() - epoch_started, 1e-9)
        scores = {} if val is None else _scores(val.labels, predict_probs(
            kept, val.images, val.positions, batch_size=cfg.batch_size * 2, device=device, precision=cfg.precision))
        score = _selection_score(cfg.select_metric, scores, epoch)
        selected = score > best.score
        if selected:
            best = Best(epoch, score)
            run.save_best(kept, cfg, epoch, step)
        run.log_epoch(EPOCH_COLUMNS, {"epoch": epoch, "step": step, **scores, "selected": int(selected),
                                      "train_img_s": f"{train_img_s:.2f}"})
        if scores:
            logger.info("epoch %d: val loss %.4f, ba %.4f, auc %.4f; kept epoch %d (%s)", epoch, scores["val_loss"],
                        scores["ba"], scores["auc"], best.epoch, cfg.select_metric)
        run.save_last(model, optimizer, cfg, step, best, pending, ema=ema)
    progress.close()

    if dist_info.is_main:
        _finish(run, cfg, device, val, test)
    barrier(dist_info)
    shutdown(dist_info)
    return run.path


def _scores(labels: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    return {"val_loss": log_loss(labels, prob), **classification_metrics(labels, prob)}


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's batched augmentation: a function of (seed, step, rank) alone, so a resumed run
    draws exactly what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


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


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adamax as in the paper; AdamW with decoupled weight decay, none on biases and normalisation layers."""
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=cfg.clr_low, betas=cfg.betas, eps=cfg.eps)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _finish(run: RunDir, cfg: TrainConfig, device: torch.device, val: SplitImages | None,
            test: SplitImages | None) -> None:
    """Score val and test with the selected checkpoint; write predictions and metrics."""
    best = load_checkpoint(run.best)
    model = create_member(cfg.member, pretrained=False).to(device)
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
