"""``fit(cfg)``: the paper's protocol, readable top to bottom.

Adamax + triangular2 cyclic lr, cross-entropy, oversampled and augmented 300 px center crops; the best
epoch on the validation split (``cfg.select_metric``) is kept and scores val and test. Every step can be
resumed exactly: model, optimizer, step and RNG live in the checkpoint, and batches and augmentation are
functions of (seed, epoch, step).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..data.dataset import CellDataset, oversample_indices
from ..data.manifest import read_manifest, write_csv_atomic
from ..data.problems import write_problems
from ..data.split import check_subject_disjoint
from ..data.transforms import train_augmentation
from ..errors import AlldetectError
from ..inference import autocast, predict_probs, resolve_device
from ..metrics import METRIC_NAMES, classification_metrics
from ..models import create_member
from ..predictions import write_predictions
from .checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from .config import TrainConfig
from .data import SplitImages, load_split
from .distributed import DistInfo, barrier, init_distributed, shutdown
from .sampler import EpochBatches
from .schedule import triangular2_lr

logger = logging.getLogger(__name__)
HISTORY_COLUMNS = ("step", "epoch", "lr", "loss")
EPOCH_COLUMNS = ("epoch", "step", "val_loss", *METRIC_NAMES, "selected")


def fit(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train one member; returns the run directory. ``resume`` continues from ``<run>/checkpoints/last.pt``."""
    run = Path(cfg.out)
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    last_ckpt = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last_ckpt) if resume and last_ckpt.is_file() else None
    if state is not None:
        cfg = _resumed_config(cfg, state)
    elif resume:
        logger.info("no checkpoint at %s: starting from scratch", last_ckpt)
    torch.manual_seed(cfg.seed)

    rows = read_manifest(cfg.manifest)
    check_subject_disjoint(rows)
    cache_dir = cfg.cache_dir or Path(cfg.manifest).resolve().parent / ".alldetect-cache"
    load = dict(crop=cfg.crop, size=cfg.input_size, cache_dir=cache_dir)
    train, val = load_split(rows, "train", **load), load_split(rows, "val", **load)
    test = load_split(rows, "test", required=False, **load)
    if len(set(train.labels.tolist())) < 2:
        raise AlldetectError("the training split holds one class only; both all and hem are needed")

    model = create_member(cfg.member, pretrained=cfg.pretrained and state is None, weights=cfg.weights
                          if state is None else None).to(device)
    if dist_info.world_size > 1 and device.type == "cuda":  # batch statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.clr_low, betas=cfg.betas, eps=cfg.eps)
    indices = oversample_indices(train.labels, seed=cfg.seed) if cfg.oversample else np.arange(len(train.rows))
    batches = EpochBatches(indices, batch_size=cfg.batch_size, seed=cfg.seed,
                           world_size=dist_info.world_size, rank=dist_info.rank)
    steps_per_epoch, total_steps = batches.steps_per_epoch, batches.steps_per_epoch * cfg.epochs
    half_cycle = cfg.clr_step_epochs * steps_per_epoch

    step, best = 0, {"epoch": -1, "score": -math.inf}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        restore_rng(state["rng"])
        logger.info("resuming %s at step %d of %d", run, step, total_steps)
    if dist_info.is_main:
        _start_run_files(run, cfg, step, fresh=state is None, problems=train.problems + val.problems +
                         (test.problems if test else []))
    net: nn.Module = torch.compile(model) if cfg.compile else model
    if dist_info.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = CellDataset(train.images, train.labels, train_augmentation() if cfg.augment else None,
                          positions=train.positions)
    loss_fn = nn.CrossEntropyLoss()
    workers = _workers(cfg, device)
    pending: list[tuple[int, int, float, torch.Tensor]] = []  # history rows not yet written (loss on device)

    progress = tqdm(total=total_steps, initial=step, desc=f"train {cfg.member}", unit="step",
                    disable=None if dist_info.is_main else True, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        loader = DataLoader(dataset, batch_sampler=batches.epoch(epoch, start_step=first), num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed))
        net.train()
        for images, labels in loader:
            lr = triangular2_lr(step, low=cfg.clr_low, high=cfg.clr_high, half_cycle=half_cycle)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, cfg.precision):
                loss = loss_fn(net(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pending.append((step, epoch, lr, loss.detach()))
            step += 1
            seen += len(labels) * dist_info.world_size
            progress.update(1)
            progress.set_postfix(img_s=f"{seen / (time.perf_counter() - started):.1f}", lr=f"{lr:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                _checkpoint(run, model, optimizer, cfg, step, best, pending, dist_info)

        # end of epoch: validate, keep the best, checkpoint
        val_prob = predict_probs(model, val.images, val.positions, batch_size=cfg.batch_size * 2, device=device,
                                 precision=cfg.precision, channels_last=cfg.channels_last)
        scores = _scores(val.labels, val_prob)
        selected = scores[cfg.select_metric] > best["score"]
        if selected:
            best = {"epoch": epoch, "score": scores[cfg.select_metric]}
            if dist_info.is_main:
                save_checkpoint({"member": cfg.member, "model": model.state_dict(), "config": asdict(cfg),
                                 "epoch": epoch, "step": step}, run / "checkpoints" / "best.pt")
        if dist_info.is_main:
            _append_csv(run / "epochs.csv", EPOCH_COLUMNS, [{"epoch": epoch, "step": step, **scores,
                                                             "selected": int(selected)}])
        logger.info("epoch %d: val %s %.4f (best %.4f at epoch %d)", epoch, cfg.select_metric,
                    scores[cfg.select_metric], best["score"], best["epoch"])
        _checkpoint(run, model, optimizer, cfg, step, best, pending, dist_info)
    progress.close()

    if dist_info.is_main:
        _finish(run, cfg, device, val, test)
    barrier(dist_info)
    shutdown(dist_info)
    return run


def _scores(labels: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    eps = 1e-7
    p = np.clip(prob, eps, 1 - eps)
    val_loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return {"val_loss": val_loss, **classification_metrics(labels, prob)}


def _checkpoint(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                best: dict, pending: list, dist_info: DistInfo) -> None:
    """Write pending history rows, then ``last.pt``: the history never runs ahead of the checkpoint
    by more than the steps a resume will redo (and those rows are dropped on resume)."""
    if dist_info.is_main:
        losses = torch.stack([p[3] for p in pending]).float().cpu().tolist() if pending else []  # syncs
        _append_csv(run / "history.csv", HISTORY_COLUMNS,
                    [{"step": s, "epoch": e, "lr": f"{lr:.10g}", "loss": f"{loss:.6f}"}
                     for (s, e, lr, _), loss in zip(pending, losses)])
        save_checkpoint({"member": cfg.member, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "best": best, "config": asdict(cfg), "rng": rng_state()},
                        run / "checkpoints" / "last.pt")
    pending.clear()


def _finish(run: Path, cfg: TrainConfig, device: torch.device, val: SplitImages, test: SplitImages | None) -> None:
    """Score val and test with the selected checkpoint; write predictions and metrics."""
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    model = create_member(cfg.member, pretrained=False).to(device)
    model.load_state_dict(best["model"])
    metrics = {"member": cfg.member, "select_metric": cfg.select_metric, "best_epoch": best["epoch"]}
    for name, split in (("val", val), ("test", test)):
        if split is None:
            continue
        prob = predict_probs(model, split.images, split.positions, batch_size=cfg.batch_size * 2, device=device,
                             precision=cfg.precision, channels_last=cfg.channels_last)
        write_predictions(run / f"predictions_{name}.csv", [r.path for r in split.rows],
                          [r.label for r in split.rows], prob, model=cfg.member,
                          subjects=[r.subject for r in split.rows])
        metrics[name] = classification_metrics(split.labels, prob)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _start_run_files(run: Path, cfg: TrainConfig, step: int, *, fresh: bool, problems: list) -> None:
    run.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in ("history.csv", "epochs.csv", "metrics.json"):
            (run / name).unlink(missing_ok=True)
    else:
        _truncate_csv(run / "history.csv", lambda r: int(r["step"]) < step)
        _truncate_csv(run / "epochs.csv", lambda r: int(r["step"]) <= step)
    (run / "config.json").write_text(json.dumps({"config": asdict(cfg), "seed": cfg.seed, "versions": versions()},
                                                indent=2))
    write_problems(problems, run / "problems.csv")


def versions() -> dict[str, str]:
    import timm

    return {"alldetect": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "cuda": str(torch.version.cuda),
            "platform": platform.platform()}


def _resumed_config(cfg: TrainConfig, state: dict) -> TrainConfig:
    """The checkpoint's config wins for everything that shapes the result; only machinery may change."""
    saved = state["config"]
    saved["betas"] = tuple(saved["betas"])
    machinery = {"device", "workers", "compile", "checkpoint_every", "cache_dir", "out", "manifest"}
    return replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in machinery})


def _workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def _append_csv(path: Path, columns: tuple[str, ...], records: list[dict]) -> None:
    if not records:
        return
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(records)
        f.flush()
        os.fsync(f.fileno())


def _truncate_csv(path: Path, keep) -> None:
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, [r for r in reader if keep(r)]
    write_csv_atomic(path, columns, rows)
