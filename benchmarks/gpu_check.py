"""Every GPU claim in one unattended run: `benchmarks/gpu_check.sh OUTDIR` (see it for the install commands).

Sections, each in its own process with a hard time limit (the whole stays under 8 minutes on one H100):
  env      card, driver, torch and CUDA versions, free memory;
  train    per member at 300x300: naive vs the shipped optimised path, the bare step, peak memory
           (benchmarks/train_throughput.py);
  paper    the paper protocol timed for real on DenseNet-121: a synthetic 450x450 set of the paper's size
           (5,822 ALL + 2,703 HEM training images, oversampled to 11,644; 2,136 validation images), generated on
           every core, one epoch of `fit()` end to end including validation; then the projected wall time of
           all five members x 12 epochs from the measured epoch and the members' relative throughput;
  infer    whole-ensemble inference at batch 64, 128 and 256: naive torch fp32 vs the shipped GPU engine (bf16),
           and onnxruntime's CUDA provider when onnxruntime-gpu could be installed.
Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md, prints the table, and ends with `gpu_check: ok` only when
every section ran. `--smoke` runs the same code paths on a CPU with tiny sizes, in about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET_S = {"env": 30, "train": 150, "paper": 170, "infer": 90}
SMOKE_BUDGET_S = {"env": 60, "train": 60, "paper": 60, "infer": 45}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the same code paths on a CPU, tiny sizes")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # run one section in this process
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        result = SECTIONS[args.section](args)
        (args.out / f"{args.section}.json").write_text(json.dumps(result, indent=1, default=str))
        return
    started = time.perf_counter()
    results = {}
    for name, budget in (SMOKE_BUDGET_S if args.smoke else BUDGET_S).items():
        results[name] = _run_section(name, budget, args)
        print(f"{name}: {results[name]['status']} in {results[name]['seconds']:.0f} s", flush=True)
    results["total_seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    report = _markdown(results, args.smoke)
    (args.out / "gpu_check.md").write_text(report)
    print(report)
    ok = all(r["status"] == "ok" for k, r in results.items() if k != "total_seconds")
    print("gpu_check: ok" if ok else "gpu_check: FAILED (see the sections above)")
    sys.exit(0 if ok else 1)


def _run_section(name: str, budget: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__)), str(args.out), "--section", name, *(["--smoke"] if args.smoke
                                                                                        else [])]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {budget} s", "seconds": budget}
    seconds = time.perf_counter() - started
    (args.out / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"status": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}", "seconds": seconds}
    return {"status": "ok", "seconds": seconds, **json.loads((args.out / f"{name}.json").read_text())}


def section_env(args: argparse.Namespace) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(card=torch.cuda.get_device_name(), free_gib=free / 2**30, total_gib=total / 2**30,
                    capability=".".join(map(str, torch.cuda.get_device_capability())),
                    driver=_nvidia_smi("driver_version"))
    else:
        info["card"] = "none (CPU smoke run)"
    return info


def section_train(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    from train_throughput import measure

    smoke = args.smoke
    members = "mobilenet,densenet121" if smoke else "vgg16,xception,mobilenet,inception_resnet_v2,densenet121"
    rows = measure(argparse.Namespace(size=80 if smoke else 300, batch=4 if smoke else 64, steps=2 if smoke else 6,
                                      device=_device(smoke), members=members, bf16=False, shipped=False))
    return {"rows": rows}


def section_paper(args: argparse.Namespace) -> dict:
    """One real epoch of the paper protocol on DenseNet-121, and the projection to the whole protocol."""
    import csv

    import torch

    from alldetect.data.index import index_folder
    from alldetect.formats.manifest import write_manifest
    from alldetect.data.split import subject_split
    from alldetect.data.synth import SynthConfig, generate
    from alldetect.training import fit, profile_config

    smoke = args.smoke
    # the paper's training and validation images (Table 3): 7,272 ALL and 3,389 HEM, in subjects of 243 cells
    wanted = {"all": 40, "hem": 20} if smoke else {"all": 5_822 + 1_450, "hem": 2_703 + 686}
    per_subject = 10 if smoke else 243
    cfg = SynthConfig(size=120 if smoke else 450, all_subjects=-(-wanted["all"] // per_subject),
                      hem_subjects=-(-wanted["hem"] // per_subject), test_all_subjects=0, test_hem_subjects=0,
                      final_subjects=0, cells_per_subject=per_subject)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        generate(tmp / "data", cfg, workers=os.cpu_count() or 1)
        rows, taken = [], {"all": 0, "hem": 0}
        for row in index_folder(tmp / "data", workers=os.cpu_count() or 1).rows:
            if taken[row.label] < wanted[row.label]:
                rows.append(row)
                taken[row.label] += 1
        rows = subject_split(rows, val_fraction=0.2, test_fraction=0.0)
        write_manifest(rows, tmp / "manifest.csv")
        generated_s = time.perf_counter() - started
        counts = {s: sum(r.split == s for r in rows) for s in ("train", "val")}
        train_cfg = profile_config("paper", member="densenet121", manifest=str(tmp / "manifest.csv"),
                                   out=str(tmp / "run"), epochs=1, pretrained=False, device=_device(smoke),
                                   crop=100 if smoke else 300, batch_size=8 if smoke else 32)
        started = time.perf_counter()
        fit(train_cfg)
        epoch_s = time.perf_counter() - started  # crop cache, one epoch, validation, final scoring
        with open(tmp / "run" / "epochs.csv", newline="") as f:
            train_img_s = float(list(csv.DictReader(f))[-1]["train_img_s"])
        with open(tmp / "run" / "history.csv", newline="") as f:
            steps = sum(1 for _ in f) - 1
    images = steps * train_cfg.batch_size
    train_rows = _section_json(args.out, "train")
    relative = {}
    if train_rows:
        by_name = {r["member"]: r["optimised img/s"] for r in train_rows}
        relative = {m: by_name["densenet121"] / v for m, v in by_name.items() if "densenet121" in by_name}
    epoch_train_s = images / train_img_s
    per_member_epoch = {m: epoch_train_s * r + (epoch_s - epoch_train_s) / 12 for m, r in relative.items()}
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "generated_images": counts, "generation_s": generated_s, "train_images_per_epoch": images,
            "epoch_wall_s": epoch_s, "shipped_train_img_s": train_img_s,
            "projected_protocol_minutes": sum(per_member_epoch.values()) * 12 / 60 if per_member_epoch else None,
            "projection": "each member's epoch = DenseNet-121's measured training time x its optimised "
                          "throughput ratio, plus a twelfth of the one-off time (cache, validation); x 12 epochs"}


def section_infer(args: argparse.Namespace) -> dict:
    """Whole-ensemble cells/s: naive fp32 member by member vs the shipped engine (bf16 on a GPU)."""
    import numpy as np
    import torch

    from alldetect.data.transforms import normalize
    from alldetect.data.geometry import Preprocess
    from alldetect.ensemble.combiners import SAP
    from alldetect.inference.torch_engine import TorchEngine
    from alldetect.models import create_member
    from alldetect.models.members import PAPER_MEMBERS

    smoke = args.smoke
    device = torch.device(_device(smoke))
    names = ["mobilenet", "densenet121"] if smoke else list(PAPER_MEMBERS)
    size = 80 if smoke else 300
    members = [create_member(n).eval().to(device) for n in names]
    shipped = TorchEngine([m.to(memory_format=torch.channels_last) for m in members], SAP([1.0] * len(members)),
                          "sap", Preprocess(size), None, device, "auto")
    rows = []
    for batch in ((8, 16) if smoke else (64, 128, 256)):
        crops = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        x = torch.from_numpy(crops).permute(0, 3, 1, 2)

        def naive():
            with torch.no_grad():
                for m in members:
                    m.net(normalize(x, m.mean.cpu(), m.std.cpu()).to(device)).softmax(1)
            _sync(device)

        def engine():
            shipped.predict(crops)
            _sync(device)

        rows.append({"batch": batch, "naive fp32 cells/s": batch / _timed(naive),
                     "shipped engine cells/s": batch / _timed(engine)})
    return {"members": names, "size": size, "rows": rows, "onnxruntime_cuda": _ort_cuda(members, size, smoke)}


def _ort_cuda(members, size: int, smoke: bool) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"status": f"onnxruntime not importable: {e}"}
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA libraries that came with torch's CUDA build
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": f"onnxruntime {ort.__version__} has no CUDA provider (onnxruntime-gpu did not install "
                          "from the registry, or no GPU)"}
    import numpy as np
    import torch

    from alldetect.data.geometry import Preprocess
    from alldetect.ensemble.combiners import SAP
    from alldetect.export.graph import export_onnx
    from alldetect.inference.torch_engine import TorchEngine

    model = TorchEngine([m.cpu() for m in members], SAP([1.0] * len(members)), "sap", Preprocess(size), None,
                        torch.device("cpu"), "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "ensemble.onnx")
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        rows = []
        for batch in ((8,) if smoke else (64, 128, 256)):
            feed = {"images": np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
            rows.append({"batch": batch, "cells/s": batch / _timed(lambda: session.run(None, feed))})
    return {"status": "ok", "version": ort.__version__, "rows": rows}


SECTIONS = {"env": section_env, "train": section_train, "paper": section_paper, "infer": section_infer}


def _timed(fn, repeats: int = 3) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def _device(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _nvidia_smi(field: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _section_json(out: Path, name: str) -> list[dict] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()).get("rows") if path.is_file() else None


def _markdown(results: dict, smoke: bool) -> str:
    env = results["env"]
    lines = [f"# gpu_check{' (SMOKE: CPU, tiny sizes; no GPU figures)' if smoke else ''}", "",
             f"Card: {env.get('card', '?')}, driver {env.get('driver', '-')}, torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda', '-')}, free memory {env.get('free_gib', 0):.1f} of "
             f"{env.get('total_gib', 0):.1f} GiB; total {results['total_seconds']:.0f} s.", "",
             "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']:.0f} |" for k, v in results.items() if k != "total_seconds"]
    train = results["train"]
    if train["status"] == "ok":
        lines += ["", "## Training throughput (images/s)", "", _table(train["rows"])]
    paper = results["paper"]
    if paper["status"] == "ok":
        minutes = paper["projected_protocol_minutes"]
        lines += ["", "## The paper protocol", "",
                  f"DenseNet-121, one epoch of {paper['train_images_per_epoch']:,} training images "
                  f"(set: {paper['generated_images']}, generated in {paper['generation_s']:.0f} s): "
                  f"{paper['epoch_wall_s']:.1f} s end to end including the crop cache and validation; shipped "
                  f"loop {paper['shipped_train_img_s']:.0f} images/s.",
                  f"Projected five members x 12 epochs: **{minutes:.1f} min**." if minutes else
                  "No projection (the train section did not run).", f"({paper['projection']})"]
    infer = results["infer"]
    if infer["status"] == "ok":
        lines += ["", f"## Ensemble inference ({', '.join(infer['members'])}, {infer['size']} px)", "",
                  _table(infer["rows"]), "", f"onnxruntime CUDA: {infer['onnxruntime_cuda']['status']}"]
        if infer["onnxruntime_cuda"].get("rows"):
            lines += ["", _table(infer["onnxruntime_cuda"]["rows"])]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> str:
    columns = list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
