"""The domain check on real cells of other batches and on cells made out of domain.

Fits the domain reference (``data.domain.fit_domain``) on the ``--crop`` px center crops of the cells of
``--train``, as an ensemble would, then
prints, for the real cells of ``--test`` (donors the reference never saw) and for each constructed case made
from those cells (``data.out_of_domain``), the share of cells flagged and the most common reason, and the
time the measures and the check take per cell.

    python benchmarks/domain_check.py [--train ../shared/data/cnmc-dev] [--test ../shared/data/cnmc-xfold]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from alldetect.data.cell_measures import cell_measures
from alldetect.data.domain import fit_domain, measure_images
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.data.out_of_domain import CASES
from alldetect.data.geometry import center_crop

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, default=SHARED / "cnmc-dev")
    parser.add_argument("--test", type=Path, default=SHARED / "cnmc-xfold")
    parser.add_argument("--crop", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = [r for r in index_folder(args.train).rows if r.label]
    test = [r for r in index_folder(args.test).rows if r.label]
    measures, readable, _problems = measure_images([r.path for r in train], args.crop)
    reference = fit_domain(measures, [train[i].subject for i in readable], args.crop)
    print(f"reference: {reference.fitted_on} of {args.train}; flagged out of fold by donor: "
          f"{reference.flagged_out_of_fold:.1%}\n")
    frames = [read_rgb(r.path)[0] for r in test]
    rng = np.random.default_rng(args.seed)
    rows = [("real cells of new donors", frames)] + [(name, [make(f, rng) for f in frames])
                                                   for name, make in CASES.items()]
    print(f"| cells ({len(frames)} of {len({r.subject for r in test})} donors of {args.test.name}) | flagged | "
          f"most common reason |\n|---|---|---|")
    for name, case in rows:
        verdict = reference.check(cell_measures(_crops(case, args)))
        reasons = collections.Counter(n.split(";")[0] for n in verdict.notes if n)
        common = reasons.most_common(1)[0][0] if reasons else "-"
        print(f"| {name} | {1 - verdict.in_domain.mean():.1%} | {common} |")
    started = time.perf_counter()
    crops = _crops(frames, args)
    prepare = time.perf_counter() - started
    started = time.perf_counter()
    reference.check(cell_measures(crops))
    check = time.perf_counter() - started
    print(f"\nper cell: crop {prepare / len(frames) * 1e3:.2f} ms, "
          f"measures and check {check / len(frames) * 1e3:.2f} ms")


def _crops(frames: list[np.ndarray], args) -> np.ndarray:
    return np.stack([center_crop(f, args.crop) for f in frames])


if __name__ == "__main__":
    main()
