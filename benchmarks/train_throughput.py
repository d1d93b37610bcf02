"""Training throughput per member on synthetic cells of the real size (450x450 BMP), and what the shipped loop
costs beyond the network.

  (a) naive: decode and crop every BMP at every step, float NCHW, fp32, default DataLoader, per-image
      augmentation;
  (b) bare step: uint8 batches already on the device, the same model, optimizer and precision (bf16 autocast on
      CUDA, and with --bf16 on a CPU), channels_last: forward, backward, step, nothing else;
  (c) shipped loop: `fit()` itself (crops held on the device and augmented there as a batch on CUDA, DataLoader
      workers on a CPU; history, checkpoints), its training images/s over the last of two epochs (validation
      excluded), as a share of (b) at the same batch size.
Ratios are measured in the same run. Peak GPU memory is given on CUDA.

    python benchmarks/train_throughput.py [--size 300] [--batch 32] [--steps 5] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alldetect.data.cache import load_crops
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.data.split import subject_split
from alldetect.data.synth import SynthConfig, generate
from alldetect.data.geometry import Preprocess, center_crop
from alldetect.data.transforms import augmentation, normalize
from alldetect.formats.manifest import write_manifest
from alldetect.formats.tables import format_table
from alldetect.models import create_member
from alldetect.models.members import PAPER_MEMBERS
from alldetect.precision import training_autocast as autocast
from alldetect.training import fit, profile_config

warnings.filterwarnings("ignore")
PAPER_IMAGES_PER_EPOCH, PAPER_EPOCHS = 11_644, 12


class DecodeEveryTime(Dataset):
    """The naive loader: read, crop, augment and normalise each image on every access."""

    def __init__(self, paths, labels, mean, std, crop, size):
        self.paths, self.labels, self.mean, self.std, self.crop, self.size = paths, labels, mean, std, crop, size
        self.augment = augmentation("paper")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = torch.from_numpy(center_crop(read_rgb(self.paths[i])[0], self.crop).copy()).permute(2, 0, 1)
        if self.size != self.crop:
            x = torch.nn.functional.interpolate(x[None].float(), size=self.size, mode="bilinear")[0].byte()
        return normalize(self.augment(x)[None], self.mean, self.std)[0], self.labels[i]


def images_per_second(model, loader, device, steps, *, channels_last, precision) -> float:
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 1:  # the first step warms up kernels and workers
            _sync(device)
            start, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if step == steps:
            break
    _sync(device)
    return seen / (time.perf_counter() - start)


def bare_step_images_per_second(model, batch: torch.Tensor, labels: torch.Tensor, device, steps: int, *,
                                precision: str, warmup: int = 1, net=None) -> float:
    """Forward, backward and optimizer step on a uint8 batch already on the device: the network's own cost.
    ``net``: what the step calls instead of ``model`` (``model`` compiled, say); ``warmup`` steps are not timed."""
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    net = model if net is None else net
    x = batch.to(device).contiguous(memory_format=torch.channels_last)
    y = labels.to(device)
    for step in range(steps + warmup):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, precision):
            loss = loss_fn(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * len(batch) / (time.perf_counter() - start)


def synthetic_manifest(root: Path, images: int, *, frame: int = 450, workers: int = 2) -> Path:
    """A subject-split manifest of about ``images`` synthetic cells (``frame`` px BMP) under ``root``."""
    per_subject = max(2, images // 8 + 1)
    generate(root / "data", SynthConfig(size=frame, all_subjects=5, hem_subjects=3, test_all_subjects=0,
                                        test_hem_subjects=0, final_subjects=0, cells_per_subject=per_subject),
             workers=workers)
    manifest = root / "manifest.csv"
    write_manifest(subject_split(index_folder(root / "data").rows, val_fraction=0.25, test_fraction=0.0),
                   manifest)
    return manifest


def shipped_loop_images_per_second(member: str, manifest: Path, out: Path, *, crop: int, size: int | None,
                                   batch: int, device: str, precision: str) -> float:
    """Training images/s of ``fit()`` over its second epoch (the first warms caches, kernels and workers)."""
    cfg = profile_config("paper", member=member, manifest=str(manifest), out=str(out), crop=crop, input_size=size,
                         epochs=2, batch_size=batch, pretrained=False, device=device, precision=precision)
    fit(cfg)
    with open(out / "epochs.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["train_img_s"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=300, help="network input side (300: the paper's crop)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--members", default=",".join(PAPER_MEMBERS))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on a CPU too (CUDA always uses it)")
    parser.add_argument("--no-shipped", dest="shipped", action="store_false", help="skip the fit() row")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = measure(args)
    print(f"\n{args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps, device {args.device}, "
          f"torch {torch.__version__}\n")
    print(format_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                       markdown=True))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    precision = "bf16" if args.bf16 or device.type == "cuda" else "fp32"
    crop = 300
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = args.batch * (args.steps + 1)
        manifest = synthetic_manifest(tmp / "set", max(n, 3 * args.batch), workers=8 if device.type == "cuda" else 2)
        train = [r for r in index_folder(tmp / "set" / "data").rows][:n]
        paths, labels = [r.path for r in train], np.array([r.y for r in train])
        cache = load_crops(paths, Preprocess(crop, args.size), cache_dir=tmp / "cache")
        for name in args.members.split(","):
            model = create_member(name).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            naive_loader = DataLoader(DecodeEveryTime(paths, labels, model.mean.cpu(), model.std.cpu(), crop,
                                                      args.size), batch_size=args.batch, shuffle=True)
            naive = images_per_second(model.net, naive_loader, device, args.steps, channels_last=False,
                                      precision="fp32")
            model = model.to(memory_format=torch.channels_last)
            batch = torch.from_numpy(np.ascontiguousarray(cache.images[:args.batch])).permute(0, 3, 1, 2)
            bare = bare_step_images_per_second(model, batch, torch.from_numpy(labels[:args.batch]), device,
                                               args.steps, precision=precision)
            row = {"member": name, "naive img/s": naive, "bare step img/s": bare, "bare / naive": bare / naive}
            if args.shipped:
                shipped = shipped_loop_images_per_second(name, manifest, tmp / "runs" / name, crop=crop,
                                                         size=args.size if args.size != crop else None,
                                                         batch=args.batch, device=args.device,
                                                         precision=precision)
                row.update({"shipped loop img/s": shipped, "shipped / bare": shipped / bare})
            if device.type == "cuda":
                row["peak GPU memory GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            print(f"measured {name}", flush=True)
    return rows


if __name__ == "__main__":
    main()
