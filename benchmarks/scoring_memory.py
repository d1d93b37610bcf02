"""Resident memory of a process that scores requests of every size, as a server does, over repeated sweeps.

Each sweep scores one request of each size 1..N cells (real BMPs, with the ensemble's TTA default), in a shuffled
order; after each request the freed heap is handed back to the system (``serve.app.release_memory``, as the web
app does) or not (``--keep-heap``). Prints the process's RSS after loading and after each sweep: memory that
keeps growing from sweep to sweep is not bounded; memory that stops growing is a cache of the largest shapes
seen.

    python benchmarks/scoring_memory.py ENS_DIR [--engine torch|onnx] [--sweeps 4] [--largest 40] [--keep-heap]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import alldetect
from alldetect.serve.app import release_memory

DEFAULT_CELLS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc-dev" / "bmp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ens_dir", type=Path)
    parser.add_argument("--engine", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--sweeps", type=int, default=4)
    parser.add_argument("--largest", type=int, default=40, help="cells in the largest request")
    parser.add_argument("--keep-heap", action="store_true", help="do not hand freed heap back after a request")
    parser.add_argument("--cells", type=Path, default=DEFAULT_CELLS)
    args = parser.parse_args()
    cells = sorted(args.cells.rglob("*.bmp"))
    ensemble = alldetect.load(args.ens_dir, engine=args.engine, device="cpu")
    heap = "kept" if args.keep_heap else "handed back"
    print(f"| {args.engine} engine, heap {heap} | RSS | seconds |\n|---|---|---|")
    print(f"| loaded | {_rss_mb():.0f} MB | - |")
    order = random.Random(0)
    for sweep in range(1, args.sweeps + 1):
        began = time.perf_counter()
        sizes = list(range(1, args.largest + 1))
        order.shuffle(sizes)
        for size in sizes:
            ensemble.predict([cells[k % len(cells)] for k in range(size)], domain_check=False)
            if not args.keep_heap:
                release_memory()
        print(f"| after sweep {sweep} | {_rss_mb():.0f} MB | {time.perf_counter() - began:.0f} |")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 / 1e6 for line in f if line.startswith("VmRSS:"))


if __name__ == "__main__":
    main()
