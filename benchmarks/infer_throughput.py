"""Inference throughput of the five-member ensemble on this machine's CPU (or a GPU with --device cuda).

Per member and for the whole ensemble, cells per second at 300x300, batch 16, for
  (a) naive: PyTorch eager, NCHW, fp32, float input normalised outside the model, member by member;
  (b) torch: channels_last, inference_mode, uint8 batch normalised inside the member;
  (c) onnxruntime: each member exported to ONNX (fp32);
  (d) torch bf16: (b) under bf16 autocast (native on CPUs with AVX-512 BF16 or AMX, and on GPUs);
  (e) onnxruntime int8: (c) quantised statically (int8 weights per channel, uint8 activations; VNNI).
Then the engines `alldetect predict` ships, each running the whole ensemble as it does on a batch of crops:
torch with bf16 (TorchEngine), the exported fp32 graph and its int8 copy (OnnxEngine).
Then the domain check (``data.domain``: the measures of each cell's crop and the checks) on synthetic cells
of the same size, as a share of each shipped engine's time per cell.
Ratios are against (a) measured in the same run. Weights are random, and (e)'s activation ranges come from
random pixels: speed depends on neither. With --accuracy ENS_DIR, also the AUC change of bf16 and of int8
(calibrated on that ensemble's validation cells, as `alldetect export` does) against fp32 on its test split.

With --domain-check ENS_DIR, only the domain check against that ensemble folder's engine (as `predict` loads
it, with and without TTA) on the same cells, in one run.

    python benchmarks/infer_throughput.py [--size 300] [--batch 16] [--repeats 2] [--accuracy runs/demo/ensemble]
    python benchmarks/infer_throughput.py --domain-check ENS_DIR
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from alldetect.data.transforms import normalize
from alldetect.export.quantize import quantize_graph
from alldetect.formats.tables import format_table
from alldetect.inference.onnx_engine import onnx_session
from alldetect.models import create_member
from alldetect.models.members import PAPER_MEMBERS

warnings.filterwarnings("ignore")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def export_member(member, side: int, path: Path) -> Path:
    example = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    program = torch.onnx.export(member, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False)
    program.save(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--members", default=",".join(PAPER_MEMBERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--accuracy", type=Path, help="ensemble directory whose test set measures bf16's AUC change")
    parser.add_argument("--domain-check", type=Path, help="only: the domain check against this ensemble's engine")
    args = parser.parse_args()
    if args.domain_check:
        return print_domain_check_share(args.domain_check, args.batch, args.repeats)
    device = torch.device(args.device)
    batch_u8 = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    rows, totals = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.members.split(","):
            member = create_member(name).eval()
            mean, std = member.mean, member.std
            net = member.net.to(device)
            x_float = normalize(batch_u8, mean, std).to(device)

            def naive():
                with torch.no_grad():
                    net(x_float)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            fast = member.to(device).to(memory_format=torch.channels_last)
            x_u8 = batch_u8.to(device).contiguous(memory_format=torch.channels_last)

            def optimised(bf16: bool = False):
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    fast(x_u8)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            row = {"member": name, "naive": args.batch / timed(naive, args.repeats)}
            row["torch"] = args.batch / timed(optimised, args.repeats)
            if device.type == "cpu":
                onnx_path = export_member(member.cpu().to(memory_format=torch.contiguous_format), args.size,
                                          Path(tmp) / f"{name}.onnx")
                feed = {"images": batch_u8.numpy()}
                fp32 = onnx_session(onnx_path, threads=os.cpu_count())
                row["onnx"] = args.batch / timed(lambda: fp32.run(None, feed), args.repeats)
                int8_path = quantize_graph(onnx_path, onnx_path.with_suffix(".int8.onnx"),
                                           batch_u8[:8].numpy(), batch_size=4)
                int8 = onnx_session(int8_path, threads=os.cpu_count())
                row["onnx_int8"] = args.batch / timed(lambda: int8.run(None, feed), args.repeats)
            row["torch_bf16"] = args.batch / timed(lambda: optimised(bf16=True), args.repeats)
            for k, v in row.items():
                if k != "member":
                    totals[k] = totals.get(k, 0.0) + 1.0 / v  # seconds per cell, summed over members
            rows.append(row)
            print(f"measured {name}", flush=True)
    rows.append({"member": "ensemble", **{k: 1.0 / v for k, v in totals.items()}})
    table = [{"member": r["member"], **{f"{k} cells/s": f"{v:.2f}" for k, v in r.items() if k != "member"},
              **{f"{k} / naive": f"{v / r['naive']:.2f}x" for k, v in r.items() if k not in ("member", "naive")}}
             for r in rows]
    print(f"\n{args.size}x{args.size}, batch {args.batch}, device {device}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU threads\n")
    print(format_table(table, markdown=True))
    shipped = shipped_engines(args.members.split(","), args.size, args.batch, args.repeats)
    naive = rows[-1]["naive"]
    print(f"\nShipped engines, whole ensemble in one call (naive (a) above: {naive:.2f} cells/s)\n")
    print(format_table([{"engine": k, "cells/s": f"{v:.2f}", "/ naive": f"{v / naive:.2f}x"}
                        for k, v in shipped.items()], markdown=True))
    check = domain_check_rate(args.size, args.batch, args.repeats)
    print(f"\nDomain check: {check:.1f} cells/s, "
          + ", ".join(f"{v / check:.1%} of {k}'s time (with TTA {v / check / 8:.1%})" for k, v in shipped.items()))
    if args.accuracy:
        print_accuracy(args.accuracy, args.device)


def shipped_engines(members: list[str], size: int, batch: int, repeats: int) -> dict[str, float]:
    """Cells/s of TorchEngine (torch, bf16) and OnnxEngine (fp32 and int8 graphs) on NHWC uint8 crops."""
    from alldetect.data.geometry import Preprocess
    from alldetect.ensemble.combiners import SAP
    from alldetect.inference.onnx_engine import OnnxEngine
    from alldetect.inference.torch_engine import TorchEngine
    from alldetect.export.graph import export_onnx

    crops = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    nets = [create_member(name).eval().to(memory_format=torch.channels_last) for name in members]
    sap = SAP([1.0] * len(nets))
    model = TorchEngine(nets, sap, "sap", Preprocess(size), None, torch.device("cpu"), "bf16")
    out = {"torch bf16": batch / timed(lambda: model.predict(crops), repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(model, Path(tmp) / "ensemble.onnx")
        int8_path = quantize_graph(fp32_path, Path(tmp) / "ensemble.int8.onnx", crops[:8])
        for name, path in (("onnx fp32", fp32_path), ("onnx int8", int8_path)):
            engine = OnnxEngine(onnx_session(path, threads=os.cpu_count()), members, sap, "sap", Preprocess(size),
                                "uint8")
            out[name] = batch / timed(lambda: engine.predict(crops), repeats)
    return out


def domain_check_rate(size: int, batch: int, repeats: int) -> float:
    """Cells/s of the domain check (measures of each crop, then the checks) on synthetic cells of ``size``."""
    from alldetect.data.cell_measures import cell_measures
    from alldetect.data.domain import fit_domain
    from alldetect.data.out_of_domain import synthetic_cell

    rng = np.random.default_rng(0)
    crops = np.stack([synthetic_cell(size, rng) for _ in range(max(batch, 40))])
    reference = fit_domain(cell_measures(crops), [str(i % 8) for i in range(len(crops))], size)
    return batch / timed(lambda: reference.check(cell_measures(crops[:batch])), repeats)


def print_domain_check_share(ens_dir: Path, batch: int, repeats: int) -> None:
    """The domain check's cells/s on synthetic cells at the folder's crop, against its engine with and without
    TTA on the same cells at the model's input size."""
    from alldetect.data.out_of_domain import synthetic_cell
    from alldetect.inference.load import load_engine

    engine = load_engine(ens_dir, device="cpu")
    rng = np.random.default_rng(0)
    crops = np.stack([engine.preprocess.resize(synthetic_cell(engine.preprocess.crop, rng)) for _ in range(batch)])
    check = domain_check_rate(engine.preprocess.crop, batch, repeats)
    rows = [{"what": f"domain check ({engine.preprocess.crop} px crops)", "cells/s": f"{check:.1f}",
             "check's share": "-"}]
    for tta in (False, True):
        rate = batch / timed(lambda: engine.predict(crops, tta=tta), repeats)
        rows.append({"what": f"{type(engine).__name__} of {ens_dir}{' with TTA' if tta else ''}",
                     "cells/s": f"{rate:.1f}", "check's share": f"{rate / check:.1%}"})
    print(format_table(rows, markdown=True))


def print_accuracy(ens_dir: Path, device: str) -> None:
    """AUC of the ensemble on its test split with fp32 members vs bf16 members vs the int8 graph, and the
    largest change of a cell's P(ALL)."""
    from alldetect.data.cache import load_crops
    from alldetect.inference.torch_engine import TorchEngine
    from alldetect.export.ensemble import export_ensemble
    from alldetect.inference.onnx_engine import OnnxEngine
    from alldetect.evaluation.metrics import roc_auc
    from alldetect.formats.predictions import read_predictions

    with tempfile.TemporaryDirectory() as tmp:
        fp32_model = TorchEngine.from_folder(ens_dir, device=device, precision="fp32")
        preds = read_predictions(ens_dir / "predictions_test.csv")[fp32_model.method]
        crops = np.array(load_crops(preds.path, fp32_model.preprocess,
                                    cache_dir=tmp).images)
        int8_graph = export_ensemble(ens_dir, out=Path(tmp) / "ensemble.onnx").int8.path
        probs = {"fp32": fp32_model.predict(crops)[0],
                 "bf16": TorchEngine.from_folder(ens_dir, device=device, precision="bf16").predict(crops)[0],
                 "int8": OnnxEngine.from_folder(ens_dir, path=int8_graph).predict(crops)[0]}
    auc = {k: roc_auc(preds.y, p) for k, p in probs.items()}
    print(f"\n{fp32_model.method} on the test split of {ens_dir} ({len(crops)} cells): AUC fp32 {auc['fp32']:.4f}")
    for k in ("bf16", "int8"):
        print(f"  {k}: AUC {auc[k]:.4f}, change {auc[k] - auc['fp32']:+.4f}; "
              f"largest |P(ALL) change| {np.abs(probs[k] - probs['fp32']).max():.4f}")


if __name__ == "__main__":
    main()
