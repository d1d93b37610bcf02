"""How hard is the synthetic task? A logistic regression on seven hand-made features, trained and scored on
subject-disjoint splits of the default synthetic set (several seeds), next to the same baseline on the real
development cells when they are available. Prints a Markdown table.

    python benchmarks/synthetic_baseline.py [--real PATH_TO_cnmc-dev]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from alldetect.data.index import index_folder
from alldetect.data.split import subject_split
from alldetect.data.synth import SynthConfig, generate
from alldetect.evaluation.baseline import evaluate_baseline
from alldetect.formats.tables import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cnmc-dev")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth"
        generate(data, SynthConfig(final_subjects=0))
        indexed = index_folder(data).rows
        scores = [evaluate_baseline(subject_split(indexed, val_fraction=0.0, test_fraction=0.4, seed=s))
                  for s in range(args.seeds)]
        rows.append(_row("synthetic, default `alldetect synth` set (450 px)", scores))
    if args.real.is_dir():
        real = index_folder(args.real / "fold_1").rows
        scores = [evaluate_baseline(subject_split(real, val_fraction=0.0, test_fraction=0.4, seed=s))
                  for s in range(args.seeds)]
        rows.append(_row("real cnmc-dev cells (14 subjects, only 3 healthy)", scores))
    print(format_table(rows, markdown=True))


def _row(name: str, scores: list[dict]) -> dict:
    ba, auc = np.array([s["ba"] for s in scores]), np.array([s["auc"] for s in scores])
    return {"data": name, "splits": len(scores),
            "balanced accuracy": f"{ba.mean():.3f} ({ba.min():.3f}-{ba.max():.3f})",
            "AUC": f"{auc.mean():.3f} ({auc.min():.3f}-{auc.max():.3f})"}


if __name__ == "__main__":
    main()
