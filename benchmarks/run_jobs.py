"""`alldetect run` with its trainings in process and as local jobs, one after the other on the same machine: the
wall time of each, and how far each ensemble's test (or, cross-fitted, out-of-fold) probabilities lie from the
in-process run's, with the ensemble's AUC and balanced accuracy beside them. Each run has its own folder under
``--out``; a finished one is reused, so its time is only meaningful in a fresh ``--out``.

    python benchmarks/run_jobs.py --out runs/run_jobs                      # the synthetic demo: none, local x1, x2
    python benchmarks/run_jobs.py --data DIR --out runs/run_jobs-data --jobs 2   # real cells: none, then local x2
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from alldetect.evaluation.metrics import classification_metrics
from alldetect.formats.predictions import read_predictions
from alldetect.formats.tables import format_table
from alldetect.pipeline import PipelineConfig, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="[default: the built-in synthetic cells]")
    parser.add_argument("--out", type=Path, default=Path("runs/run_jobs"))
    parser.add_argument("--jobs", type=int, action="append", help="local jobs at once, repeatable [default: 1, 2]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = {"in process": dict(executor="none")}
    runs |= {f"local, --jobs {n}": dict(executor="local", jobs=n) for n in (args.jobs or [1, 2])}
    rows, reference = [], None
    for name, options in runs.items():
        out = args.out / name.replace(", --jobs ", "-").replace(" ", "-")
        started = time.perf_counter()
        report = run_pipeline(PipelineConfig(out=str(out), data=str(args.data) if args.data else None, seed=args.seed,
                                             **options))
        wall = time.perf_counter() - started
        folder = report.parent
        split = "test" if (folder / "predictions_test.csv").is_file() else "val"
        scored = read_predictions(folder / f"predictions_{split}.csv")
        method = next(m for m in scored if m.startswith("wen_kappa"))
        preds = scored[method]
        reference = reference or scored
        moved = max(float(np.max(np.abs(scored[m].prob_all - reference[m].prob_all))) for m in scored)
        m = classification_metrics(preds.y, preds.prob_all)
        rows.append({"trainings": name, "wall": f"{wall / 60:.1f} min", f"largest change of any {split} P(ALL)":
                     f"{moved:.2e}", "WEN-kappa AUC": f"{m['auc']:.4f}", "WEN-kappa BA (0.5)": f"{m['ba']:.4f}"})
    print(format_table(rows, markdown=True))
    print(f"\n{platform.platform()}; data: {args.data or 'synthetic demo'}")


if __name__ == "__main__":
    main()
