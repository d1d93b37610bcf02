"""Cross-batch yardstick: train on one set of donors through the product's own path (``alldetect run --data``,
its validation or cross-fitting scheme included), then score donors of other batches that training never saw,
by cell and by donor, each figure with a 95% bootstrap interval over the test donors.

    python benchmarks/cross_batch.py --train ../shared/data/cnmc-dev --test ../shared/data/cnmc-xfold
    python benchmarks/cross_batch.py ... --input-size 128 --out runs/cross_batch/128
    python benchmarks/cross_batch.py --ensemble runs/x/ensemble --test ../shared/data/cnmc-xfold   # score only
    python benchmarks/cross_batch.py ... --refit    # also: each member trained once on every training donor

Every member and every combiner is scored at the ensemble's shipped operating point and at the paper's 0.5
(members have no fitted point: 0.5). With ``--refit``, each member is also trained once on all training donors
and combined with the combiners and operating points fitted on the cross-fit's out-of-fold predictions, to
compare shipping the refit with shipping the average of the fold models. Prints one table and writes
``<out>/cross_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

import alldetect._torchvision  # noqa: F401  (before timm and torchvision)
from alldetect.data.index import index_folder
from alldetect.ensemble.spec import load_ensemble_spec
from alldetect.evaluation.evaluate import donor_bootstrap_ci, donor_metrics
from alldetect.formats.manifest import write_manifest
from alldetect.formats.operating_point import PAPER_POINT
from alldetect.formats.tables import format_table
from alldetect.inference.predict import load_crops_for
from alldetect.inference.torch_engine import load_ensemble
from alldetect.models.runtime import resolve_device, score_members
from alldetect.pipeline import PipelineConfig, choose_recipe, run_pipeline
from alldetect.training import fit, profile_config
from alldetect.training.checkpoint import load_checkpoint
from alldetect.models import create_member

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
logger = logging.getLogger("cross_batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, default=SHARED / "cnmc-dev", help="donors to train on")
    parser.add_argument("--test", type=Path, default=SHARED / "cnmc-xfold", help="donors of other batches")
    parser.add_argument("--ensemble", type=Path, help="score this ensemble folder instead of training one")
    parser.add_argument("--out", type=Path, default=Path("runs/cross_batch"))
    parser.add_argument("--profile", help="as `alldetect run --profile` [default: its choice for real cells]")
    parser.add_argument("--members", help="comma-separated [default: `alldetect run`'s choice]")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--folds", type=int, help="as `alldetect run --folds`")
    parser.add_argument("--refit", action="store_true", help="also train each member once on every training donor")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the test donors")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds per member: 1 epoch at 32 px, for tests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for quiet in ("alldetect.training.loop", "alldetect.ensemble.build", "alldetect.pipeline"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    if args.quick:
        args.epochs, args.input_size = 1, 32
    result = run(args)
    print(format_table(result["table"]))
    print(f"wall time {result['wall_s'] / 60:.1f} min (training {result['train_s'] / 60:.1f} min); "
          f"{result['test_donors']} test donors; written {args.out / 'cross_batch.json'}")


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    cfg = None
    if args.ensemble is None:
        cfg = PipelineConfig(out=str(args.out / "run"), data=str(args.train), profile=args.profile,
                             members=tuple(args.members.split(",")) if args.members else None,
                             input_size=args.input_size, epochs=args.epochs, folds=args.folds,
                             pretrained=args.pretrained, device=args.device, seed=args.seed, bootstrap=200)
        run_pipeline(cfg)
        ens_dir = args.out / "run" / "ensemble"
    else:
        ens_dir = args.ensemble
    train_s = time.perf_counter() - started
    model = load_ensemble(ens_dir, device=args.device)
    spec = model.spec
    rows = [r for r in index_folder(args.test).rows if r.label]
    errors: dict[str, str] = {}
    crops, kept = load_crops_for(model, rows, errors)
    rows = [rows[i] for i in kept]
    y, subjects = np.array([int(r.y) for r in rows]), [r.subject for r in rows]
    members = model.member_probs(crops, tta=model.default_tta)
    probs = {"shipped": {**{n: members[k] for k, n in enumerate(model.names)},
                         **{m: fit.apply(members) for m, fit in spec.methods.items()}}}
    if args.refit:
        refit = _refit_members(args, cfg, ens_dir, crops, model.default_tta)
        probs["refit"] = {**{n: refit[k] for k, n in enumerate(model.names)},
                          **{m: fit.apply(refit) for m, fit in spec.methods.items()}}
    table, predictions = [], {}
    for variant, scored in probs.items():
        for name, prob in scored.items():
            predictions[f"{variant}|{name}"] = prob.tolist()
            shipped = spec.operating_point(name) if name in spec.methods else PAPER_POINT
            for label, point in (("shipped", shipped), ("0.5", PAPER_POINT)):
                if label == "0.5" and shipped == PAPER_POINT:
                    continue
                table.append(_row(variant, name, label, point, y, prob, subjects, args))
    result = {"train": str(args.train), "test": str(args.test), "ensemble": str(ens_dir),
              "config": None if cfg is None else {k: str(v) for k, v in vars(choose_recipe(cfg)).items()},
              "cross_fitted": spec.cross_fitted, "folds": spec.members[0].folds, "members": model.names,
              "input_size": spec.input_size, "tta": model.default_tta, "machine": platform.platform(),
              "test_donors": len(set(subjects)), "test_cells": len(y), "unreadable": errors,
              "operating_points": {m: p.to_json() for m, p in spec.operating_points.items()},
              "train_s": train_s, "wall_s": time.perf_counter() - started, "table": table,
              "labels": y.tolist(), "subjects": subjects, "predictions": predictions}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_batch.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _row(variant: str, name: str, label: str, point, y: np.ndarray, prob: np.ndarray, subjects: list[str],
         args: argparse.Namespace) -> dict:
    m = donor_metrics(y, prob, subjects, point=point)
    ci = donor_bootstrap_ci(y, prob, subjects, point=point, n_boot=args.bootstrap, seed=args.seed)
    donors = {s: int(y[np.asarray(subjects) == s].max()) for s in set(subjects)}
    n_all, n_hem = sum(donors.values()), len(donors) - sum(donors.values())

    def interval(key: str, scale: float = 1.0) -> str:
        lo, hi = ci[key]
        return f"{lo * scale:.2f}-{hi * scale:.2f}"

    return {"variant": variant, "model": name, "point": label, "threshold": point.cell_threshold,
            "auc": m["auc"], "auc_ci": interval("auc"), "ba": m["ba"], "ba_ci": interval("ba"),
            "sens": m["sensitivity"], "sens_ci": interval("sensitivity"),
            "spec": m["specificity"], "spec_ci": interval("specificity"), "wfs": m["wfs"], "wfs_ci": interval("wfs"),
            "donors": f"{round(m['subjects_right'] * len(donors))}/{len(donors)}",
            "donors_ci": interval("subjects_right", len(donors)),
            "all": f"{round(m['all_right'] * n_all)}/{n_all}", "hem": f"{round(m['hem_right'] * n_hem)}/{n_hem}",
            "hem_ci": interval("hem_right", n_hem),
            "subj_auc": m["subject_auc"], "subj_auc_ci": interval("subject_auc")}


def _refit_members(args: argparse.Namespace, cfg: PipelineConfig | None, ens_dir: Path, crops: np.ndarray,
                   tta: bool) -> np.ndarray:
    """Each member trained once on every training donor (no validation: the last epoch is kept, as the
    cross-fit's fold models keep theirs), scored on the test crops."""
    if cfg is None:
        raise SystemExit("--refit trains: give --train, not --ensemble")
    recipe = choose_recipe(cfg)
    spec = load_ensemble_spec(ens_dir)
    root = args.out / "refit"
    rows = [r.with_split("train") for r in index_folder(args.train).rows if r.label]
    manifest = root / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, manifest)
    device = resolve_device(args.device)
    members = []
    for name in spec.names:
        out = root / name
        config = profile_config(recipe.profile, member=name, manifest=str(manifest), out=str(out),
                                input_size=recipe.input_size, epochs=recipe.epochs, pretrained=recipe.pretrained,
                                seed=args.seed, device=args.device)
        if not (out / "metrics.json").is_file():
            fit(config, resume=(out / "checkpoints" / "last.pt").is_file())
        member = create_member(name)
        member.load_state_dict(load_checkpoint(out / "checkpoints" / "best.pt")["model"])
        members.append(member.to(device).eval())
    return score_members(members, crops, device=device, tta=tta)


if __name__ == "__main__":
    main()
