"""Training throughput per member at 300x300 on synthetic cells of the real size (450x450 BMP), and the
projected wall time of the paper's full protocol (5 members x 12 epochs x 11,644 oversampled images).

  (a) naive: decode and crop every BMP at every step, float NCHW, fp32, no DataLoader workers;
  (b) optimised: the decoded-crop cache, uint8 batches, channels_last, workers and pinned memory on CUDA,
      bf16 autocast on CUDA;
  (c) optimised + bf16 autocast on CPU (opt-in there: `--precision bf16` is not the CPU default).
Ratios are against (a), measured in the same run.

    python benchmarks/train_throughput.py [--batch 8] [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alldetect.data.cache import load_crops
from alldetect.data.dataset import CellDataset
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.data.synth import SynthConfig, generate
from alldetect.data.transforms import center_crop, normalize, train_augmentation
from alldetect.inference import autocast
from alldetect.models import create_member
from alldetect.models.members import PAPER_MEMBERS
from alldetect.tables import format_table

warnings.filterwarnings("ignore")
PAPER_IMAGES_PER_EPOCH, PAPER_EPOCHS = 11_644, 12


class DecodeEveryTime(Dataset):
    """The naive loader: read, crop, augment and normalise each image on every access."""

    def __init__(self, paths, labels, mean, std):
        self.paths, self.labels, self.mean, self.std = paths, labels, mean, std
        self.augment = train_augmentation()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = torch.from_numpy(center_crop(read_rgb(self.paths[i])[0], 300).copy()).permute(2, 0, 1)
        return normalize(self.augment(x)[None], self.mean, self.std)[0], self.labels[i]


def images_per_second(model, loader, device, steps, *, channels_last, precision) -> float:
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 1:  # the first step warms up kernels and workers
            if device.type == "cuda":
                torch.cuda.synchronize()
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--members", default=",".join(PAPER_MEMBERS))
    args = parser.parse_args()
    device = torch.device(args.device)
    workers = 8 if device.type == "cuda" else 0
    with tempfile.TemporaryDirectory() as tmp:
        n = args.batch * (args.steps + 1)
        generate(Path(tmp) / "data", SynthConfig(all_subjects=3, hem_subjects=2, test_all_subjects=0,
                                                 test_hem_subjects=0, final_subjects=0,
                                                 cells_per_subject=max(1, n // 5 + 1)), workers=2)
        rows = index_folder(Path(tmp) / "data").rows[:n]
        paths, labels = [r.path for r in rows], np.array([r.y for r in rows])
        cache = load_crops(paths, crop=300, cache_dir=Path(tmp) / "cache")
        table = []
        for name in args.members.split(","):
            model = create_member(name).to(device)
            naive_loader = DataLoader(DecodeEveryTime(paths, labels, model.mean.cpu(), model.std.cpu()),
                                      batch_size=args.batch, shuffle=True)
            naive = images_per_second(model.net, naive_loader, device, args.steps, channels_last=False,
                                      precision="fp32")
            fast_model = model.to(memory_format=torch.channels_last)
            fast_loader = DataLoader(CellDataset(cache.images, labels, train_augmentation()), batch_size=args.batch,
                                     shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
                                     persistent_workers=workers > 0)
            fast = images_per_second(fast_model, fast_loader, device, args.steps, channels_last=True,
                                     precision="auto")
            row = {"member": name, "naive img/s": naive, "optimised img/s": fast, "optimised / naive": fast / naive}
            if device.type == "cpu":
                bf16 = images_per_second(fast_model, fast_loader, device, args.steps, channels_last=True,
                                         precision="bf16")
                row.update({"optimised+bf16 img/s": bf16, "bf16 / naive": bf16 / naive})
            table.append(row)
            print(f"measured {name}", flush=True)
    best = "optimised+bf16 img/s" if device.type == "cpu" else "optimised img/s"
    hours = {k: sum(PAPER_IMAGES_PER_EPOCH * PAPER_EPOCHS / r[k] for r in table) / 3600
             for k in ("naive img/s", best)}
    print(f"\n300x300, batch {args.batch}, {args.steps} timed steps, device {device}, torch {torch.__version__}\n")
    print(format_table([{k: (f"{v:.2f}x" if k.endswith("/ naive") else v) for k, v in r.items()} for r in table],
                       markdown=True, floats="{:.2f}"))
    print(f"\nprojected paper protocol ({len(table)} members x {PAPER_EPOCHS} epochs x {PAPER_IMAGES_PER_EPOCH:,} "
          f"images): naive {hours['naive img/s']:.1f} h, {best.split(' ')[0]} {hours[best]:.1f} h")


if __name__ == "__main__":
    main()
