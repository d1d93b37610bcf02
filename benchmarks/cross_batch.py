"""Cross-batch yardstick: train on one set of donors through the product's own path (``alldetect run --data``,
its validation or cross-fitting scheme included), then score donors of other batches that training never saw,
by cell and by donor, each figure with a 95% bootstrap interval over the test donors.

    python benchmarks/cross_batch.py --train ../shared/data/cnmc-dev --test ../shared/data/cnmc-xfold
    python benchmarks/cross_batch.py ... --input-size 128 --out runs/cross_batch/128
    python benchmarks/cross_batch.py --ensemble runs/x/ensemble --test ../shared/data/cnmc-xfold   # score only
    python benchmarks/cross_batch.py ... --refit    # also: each member trained once on every training donor
    python benchmarks/cross_batch.py --members efficientnet_lite0 --recipe plus --recipe plus-128=plus:input_size=128

Every member and every combiner is scored at the ensemble's shipped operating point and at the paper's 0.5
(members have no fitted point: 0.5). With ``--refit``, each member is also trained once on all training donors
and combined with the combiners and operating points fitted on the cross-fit's out-of-fold predictions, to
compare shipping the refit with shipping the average of the fold models.

With ``--recipe`` (repeatable, as in ``cross_subject.py``: ``NAME`` or ``NAME=PROFILE:field=value,...``) it
measures levers instead, more cheaply: each member is trained once per recipe on every training donor (the
last epoch kept) and scored on the test donors, alone and averaged (SAP), at 0.5; AUC and subject AUC need no
threshold. Prints one table and writes ``<out>/cross_batch.json``.
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
from alldetect.data.cache import load_crops
from alldetect.data.index import index_folder
from alldetect.data.transforms import DIHEDRAL_AUGMENTATIONS
from alldetect.evaluation.evaluate import donor_bootstrap_ci, donor_metrics
from alldetect.formats.manifest import write_manifest
from alldetect.formats.operating_point import PAPER_POINT
from alldetect.formats.tables import format_table
from alldetect.inference.predict import load_crops_for
from alldetect.inference.torch_engine import TorchEngine
from alldetect.models.runtime import resolve_device, score_members
from alldetect.pipeline import PipelineConfig, choose_recipe, run_pipeline
from alldetect.training import fit, profile_config
from alldetect.training.run_dir import RunDir
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
    parser.add_argument("--recipe", action="append", help="lever mode, repeatable (see above)")
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
    result = run_levers(args) if args.recipe else run(args)
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
    model = TorchEngine.from_folder(ens_dir, device=args.device)
    spec = model.spec
    rows = _labelled(args.test)
    errors: dict[str, str] = {}
    crops, kept = load_crops_for(model, rows, errors)
    rows = [rows[i] for i in kept]
    y, subjects = np.array([int(r.y) for r in rows]), [r.subject for r in rows]
    members = model.member_probs(crops, tta=model.default_tta)
    probs = {"shipped": {**{n: members[k] for k, n in enumerate(model.names)},
                         **{m: fit.apply(members) for m, fit in spec.methods.items()}}}
    if args.refit:
        refit, _, _ = _refit_members(args, cfg, args.out / "refit", None, rows)
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
              "input_size": spec.preprocess.input_size, "tta": model.default_tta, "machine": platform.platform(),
              "test_donors": len(set(subjects)), "test_cells": len(y), "unreadable": errors,
              "operating_points": {m: p.to_json() for m, p in spec.operating_points.items()},
              "train_s": train_s, "wall_s": time.perf_counter() - started, "table": table,
              "labels": y.tolist(), "subjects": subjects, "predictions": predictions}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_batch.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def run_levers(args: argparse.Namespace) -> dict:
    """Each recipe's members trained once on every training donor and scored on the test donors."""
    from cross_subject import Recipe  # the sibling yardstick's recipe syntax

    started = time.perf_counter()
    rows = _labelled(args.test)
    y, subjects = np.array([int(r.y) for r in rows]), [r.subject for r in rows]
    table, predictions = [], {}
    members = args.members.split(",") if args.members else None
    for recipe in map(Recipe.parse, args.recipe):
        cfg = PipelineConfig(out=str(args.out / recipe.name), data=str(args.train), profile=None, members=members,
                             input_size=recipe.overrides.get("input_size", args.input_size), epochs=args.epochs,
                             pretrained=args.pretrained, device=args.device, seed=args.seed)
        probs, names, kept = _refit_members(args, cfg, args.out / recipe.name / "refit", recipe, rows)
        probs = {**dict(zip(names, probs)), **({"sap": probs.mean(axis=0)} if len(names) > 1 else {})}
        for name, prob in probs.items():
            predictions[f"{recipe.name}|{name}"] = prob.tolist()
            table.append(_row(recipe.name, name, "0.5", PAPER_POINT, y[kept], prob,
                              [subjects[i] for i in kept], args))
    result = {"train": str(args.train), "test": str(args.test), "recipes": args.recipe,
              "machine": platform.platform(), "test_donors": len(set(subjects)), "test_cells": len(y),
              "train_s": time.perf_counter() - started, "wall_s": time.perf_counter() - started, "table": table,
              "labels": y.tolist(), "subjects": subjects, "predictions": predictions}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_batch.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _labelled(folder: Path) -> list:
    return [r for r in index_folder(folder).rows if r.label]


def _row(variant: str, name: str, label: str, point, y: np.ndarray, prob: np.ndarray, subjects: list[str],
         args: argparse.Namespace) -> dict:
    m = donor_metrics(y, prob, subjects, point=point)
    ci = donor_bootstrap_ci(y, prob, subjects, point=point, n_boot=args.bootstrap, seed=args.seed)
    donors = {s: int(y[np.asarray(subjects) == s].max()) for s in set(subjects)}
    n_all, n_hem = sum(donors.values()), len(donors) - sum(donors.values())

    def interval(key: str, donors: int = 0) -> str:
        """The 95% interval of a metric, or of a count of ``donors`` when given."""
        lo, hi = ci[key]
        return f"{lo * donors:.0f}-{hi * donors:.0f}" if donors else f"{lo:.2f}-{hi:.2f}"

    return {"variant": variant, "model": name, "point": label, "threshold": point.cell_threshold,
            "auc": m["auc"], "auc_ci": interval("auc"), "ba": m["ba"], "ba_ci": interval("ba"),
            "sens": m["sensitivity"], "sens_ci": interval("sensitivity"),
            "spec": m["specificity"], "spec_ci": interval("specificity"), "wfs": m["wfs"], "wfs_ci": interval("wfs"),
            "donors": f"{round(m['subjects_right'] * len(donors))}/{len(donors)}",
            "donors_ci": interval("subjects_right", len(donors)),
            "all": f"{round(m['all_right'] * n_all)}/{n_all}", "hem": f"{round(m['hem_right'] * n_hem)}/{n_hem}",
            "hem_ci": interval("hem_right", n_hem),
            "subj_auc": m["subject_auc"], "subj_auc_ci": interval("subject_auc")}


def _refit_members(args: argparse.Namespace, cfg: PipelineConfig | None, root: Path, recipe,
                   test_rows: list) -> tuple[np.ndarray, list[str], list[int]]:
    """Each member of ``cfg``'s recipe (with ``recipe``'s overrides, if any) trained once on every training
    donor, with no validation (the last epoch is kept, as the cross-fit's fold models keep theirs), scored on
    the test rows with test-time augmentation when trained with the eight symmetries. Returns (members, cells)
    P(ALL), the member names and the indices of the test rows that could be read."""
    if cfg is None:
        raise SystemExit("--refit trains: give --train, not --ensemble")
    chosen = choose_recipe(cfg)
    manifest = root / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest([r.with_split("train") for r in _labelled(args.train)], manifest)
    device = resolve_device(args.device)
    overrides = dict(recipe.overrides) if recipe else {}
    profile = recipe.profile if recipe else chosen.profile
    members, configs = [], []
    for name in chosen.members:
        out = root / name
        config = profile_config(profile, **{**dict(member=name, manifest=str(manifest), out=str(out),
                                                   input_size=chosen.input_size, epochs=chosen.epochs,
                                                   pretrained=chosen.pretrained, seed=args.seed,
                                                   device=args.device, select_metric="last",
                                                   cache_dir=str(args.out / ".cache")), **overrides})
        run = RunDir(out, writes=False)
        if not run.finished:
            fit(config, resume=run.last.is_file())
        member = create_member(name)
        member.load_state_dict(run.best_state()["model"])
        members.append(member.to(device).eval())
        configs.append(config)
    loaded = load_crops([r.path for r in test_rows], configs[0].preprocess,
                        cache_dir=args.out / ".cache")
    crops, kept = np.asarray(loaded.images)[loaded.usable], np.flatnonzero(loaded.usable).tolist()
    tta = all(c.augment in DIHEDRAL_AUGMENTATIONS for c in configs)
    return score_members(members, crops, device=device, tta=tta), list(chosen.members), kept


if __name__ == "__main__":
    main()
