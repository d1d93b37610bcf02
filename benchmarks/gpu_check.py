"""Every GPU claim in one unattended run: `benchmarks/gpu_check.sh OUTDIR` (see it for the install commands).

Sections, each in its own process with a hard time limit (the whole is meant to take under 6 minutes on one
H100/H200):
  env      card, driver, torch and CUDA versions, free memory;
  data     a synthetic set of the paper's size (Table 3: 7,272 ALL and 3,389 HEM training and validation images
           in subjects of 243 cells) made of 384 distinct 450x450 frames rendered on every core, each file a hard
           link to one of them (the frames are real BMPs that are decoded and cropped like any other; rendering
           10,661 distinct ones would cost more than all the training below); and 5,120 cells for `predict`;
  train    torch's profiler over steps of the shipped loop (`fit()`, DenseNet-121): where the time goes;
  paper    one real epoch of `fit()` (the paper profile) for each of the five members on the paper-size set, its
           steady rate as a share of the bare step (forward, backward, optimizer step on a batch already on the
           GPU) at the paper's batch (32) and input (300 px), and all five members x 12 epochs from those epochs
           (benchmarks/train_throughput.py also has the naive fp32 loop that decodes every BMP at every step);
  infer    the five-member ensemble at batch 64, 128 and 256: naive torch fp32 against the shipped engine, and
           onnxruntime's CUDA provider when it is installed; then `alldetect ensemble` and `predict` end to end
           on 5,120 cells (decoding and the domain check included), with the share spent decoding;
  options  the bare step with torch.compile (mode reduce-overhead: CUDA graphs) at the paper's batch, with its
           compile time, against eager.
Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md, prints the table, and ends with `gpu_check: ok` only when
every section ran. `--smoke` runs the same code paths on a CPU with tiny sizes, in about 3 minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET_S = {"env": 30, "data": 45, "train": 45, "paper": 180, "infer": 90, "options": 75}
SMOKE_BUDGET_S = {"env": 60, "data": 60, "train": 90, "paper": 120, "infer": 120, "options": 120}
PAPER_IMAGES = {"all": 5_822 + 1_450, "hem": 2_703 + 686}  # Table 3: training + validation
PAPER_BATCH, PAPER_EPOCHS, CELLS_PER_SUBJECT = 32, 12, 243
PREDICT_CELLS = 5_120


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the same code paths on a CPU, tiny sizes")
    parser.add_argument("--only", help="comma-separated sections to run (env and data always run)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # run one section in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # the sections' shared scratch folder
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        result = SECTIONS[args.section](args)
        (args.out / f"{args.section}.json").write_text(json.dumps(result, indent=1, default=str))
        return
    started = time.perf_counter()
    results = {}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        only = set(args.only.split(",")) | {"env", "data"} if args.only else set(SECTIONS)
        for name, budget in (SMOKE_BUDGET_S if args.smoke else BUDGET_S).items():
            if name not in only:
                results[name] = {"status": "not run (--only)", "seconds": 0.0}
                continue
            results[name] = _run_section(name, budget, args, work)
            print(f"{name}: {results[name]['status']} in {results[name]['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    report = _markdown(results, args.smoke)
    (args.out / "gpu_check.md").write_text(report)
    print(report)
    ok = all(r["status"] == "ok" for k, r in results.items() if k != "total_seconds" and k in only)
    print("gpu_check: ok" if ok else "gpu_check: FAILED (see the sections above)")
    sys.exit(0 if ok else 1)


def _run_section(name: str, budget: int, args: argparse.Namespace, work: Path) -> dict:
    command = [sys.executable, str(Path(__file__)), str(args.out), "--section", name, "--work", str(work),
               *(["--smoke"] if args.smoke else [])]
    started = time.perf_counter()
    log = args.out / f"{name}.log"
    try:
        with open(log, "w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {budget} s", "seconds": budget}
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()] or ["?"]
        return {"status": f"failed: {last[-1][:300]}", "seconds": seconds}
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


def section_data(args: argparse.Namespace) -> dict:
    """The distinct frames, the paper-size manifest of hard links to them, and the cells for `predict`."""
    from alldetect.data.index import index_folder
    from alldetect.data.split import subject_split
    from alldetect.data.synth import SynthConfig, generate
    from alldetect.formats.manifest import ManifestRow, write_manifest

    smoke, work = args.smoke, args.work
    timings = {}
    started = time.perf_counter()
    cfg = SynthConfig(size=120 if smoke else 450, all_subjects=10, hem_subjects=6, test_all_subjects=0,
                      test_hem_subjects=0, final_subjects=0, cells_per_subject=4 if smoke else 24)
    generate(work / "frames", cfg, workers=os.cpu_count() or 1)
    frames = {"all": [], "hem": []}
    for row in index_folder(work / "frames").rows:
        frames[row.label].append(row.path)
    timings["render_s"] = time.perf_counter() - started

    started = time.perf_counter()
    wanted = {"all": 60, "hem": 40} if smoke else PAPER_IMAGES
    per_subject = 10 if smoke else CELLS_PER_SUBJECT
    rows = []
    for label, count in wanted.items():
        folder = work / "paper" / label
        folder.mkdir(parents=True)
        for i in range(count):
            subject = f"{label}{i // per_subject}"
            path = folder / f"{subject}_{i}.bmp"
            os.link(frames[label][i % len(frames[label])], path)
            rows.append(ManifestRow(path=str(path), label=label, subject=subject))
    rows = subject_split(rows, val_fraction=0.2, test_fraction=0.0)
    write_manifest(rows, work / "paper" / "manifest.csv")
    cells = work / "cells"
    cells.mkdir()
    everything = frames["all"] + frames["hem"]
    for i in range(64 if smoke else PREDICT_CELLS):
        os.link(everything[i % len(everything)], cells / f"cell_{i:05d}.bmp")
    timings["link_s"] = time.perf_counter() - started
    return {"distinct_frames": len(everything), "frame_px": cfg.size,
            "paper_set": {s: sum(r.split == s for r in rows) for s in ("train", "val")},
            "predict_cells": len(list(cells.iterdir())), **timings}


def section_train(args: argparse.Namespace) -> dict:
    """torch's profiler over steps of the shipped loop."""
    from alldetect.models.runtime import resolve_device

    return {"profile": _profile_shipped_loop(args, resolve_device(_device(args.smoke)))}


def _profile_shipped_loop(args: argparse.Namespace, device) -> dict:
    """torch's profiler over steps of `fit()` (DenseNet-121, paper profile): the top operators by device time,
    the host's waits for the device, and how busy the device was."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from alldetect.formats.manifest import read_manifest, write_manifest
    from alldetect.training import fit, profile_config

    smoke = args.smoke
    rows = read_manifest(args.work / "paper" / "manifest.csv")
    keep = {"train": 16 if smoke else 800, "val": 4 if smoke else 32}  # of each class
    small = [r for split, n in keep.items() for label in ("all", "hem")
             for r in [r for r in rows if r.split == split and r.label == label][:n]]
    manifest = args.work / "profile" / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(small, manifest)
    wait, warmup, active = (1, 1, 3) if smoke else (10, 3, 15)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cfg = profile_config("paper", member="densenet121", manifest=str(manifest), out=str(args.work / "profile" / "run"),
                         epochs=1, pretrained=False, device=_device(smoke), crop=100 if smoke else 300,
                         cache_dir=str(args.work / "cache"), batch_size=4 if smoke else PAPER_BATCH)
    window = {}
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active)) as prof:
        def on_step(step: int) -> None:
            if step == wait + warmup:
                window["start"] = time.perf_counter()
            if step == wait + warmup + active:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                window["end"] = time.perf_counter()
            prof.step()
        fit(cfg, on_step=on_step)
    events = prof.key_averages()
    device_time = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = sorted((e for e in events if getattr(e, "self_" + device_time, 0) > 0),
                     key=lambda e: getattr(e, "self_" + device_time), reverse=True)
    busy_us = sum(getattr(e, "self_" + device_time) for e in kernels)
    wall_us = (window["end"] - window["start"]) * 1e6 if "end" in window else None
    # the calls that make the host wait for the device (aten::item is counted apart: it also reads host tensors,
    # such as the optimizer's step counters, which wait for nothing)
    waits = {e.key: e.count / active for e in events
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item")}
    return {"steps": active, "wall_ms_per_step": wall_us / 1e3 / active if wall_us else None,
            "device_busy_share": busy_us / wall_us if wall_us and busy_us else None,
            "host_waits": waits,
            "top": [{"op": e.key[:60], "device ms/step": getattr(e, "self_" + device_time) / 1e3 / active,
                     "calls/step": e.count / active} for e in kernels[:8]]}


def section_paper(args: argparse.Namespace) -> dict:
    """One real epoch of the paper protocol per member on the paper-size set: its rate over the whole epoch and
    over its second half (the steady rate, once every one-off cost is paid), then the bare step of the same
    member at the same batch in the same process (cuDNN's plans for these shapes already built)."""
    import csv

    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from train_throughput import bare_step_images_per_second

    from alldetect.data.cache import load_crops
    from alldetect.formats.manifest import read_manifest
    from alldetect.models import create_member
    from alldetect.models.runtime import resolve_device
    from alldetect.training import fit, profile_config

    smoke = args.smoke
    device = resolve_device(_device(smoke))
    manifest = args.work / "paper" / "manifest.csv"
    rows = []
    for name in _members(smoke):
        cfg = profile_config("paper", member=name, manifest=str(manifest), out=str(args.work / "paper-runs" / name),
                             epochs=1, pretrained=False, device=_device(smoke), crop=100 if smoke else 300,
                             input_size=64 if smoke else None, cache_dir=str(args.work / "cache"),
                             batch_size=4 if smoke else PAPER_BATCH)
        marks: dict[int, float] = {}

        def on_step(step: int) -> None:
            if step in (half, last):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                marks[step] = time.perf_counter()

        train = [r for r in read_manifest(manifest) if r.split == "train"]
        last = -(-2 * max(sum(r.label == c for r in train) for c in ("all", "hem")) // cfg.batch_size)
        half = last // 2
        started = time.perf_counter()
        run = fit(cfg, on_step=on_step)
        wall = time.perf_counter() - started  # crop cache (first member only), one epoch, validation, scoring
        with open(run / "epochs.csv", newline="") as f:
            epoch_img_s = float(list(csv.DictReader(f))[-1]["train_img_s"])
        with open(run / "history.csv", newline="") as f:
            images = (sum(1 for _ in f) - 1) * cfg.batch_size
        steady = (last - half - 1) * cfg.batch_size / (marks[last] - marks[half])  # the last batch may be short
        crops = load_crops([r.path for r in train[:cfg.batch_size]], cfg.preprocess, cache_dir=cfg.cache_dir)
        model = create_member(name).to(device).to(memory_format=torch.channels_last)
        bare = bare_step_images_per_second(model, torch.from_numpy(np.array(crops.images)).permute(0, 3, 1, 2),
                                           torch.tensor([r.y for r in train[:cfg.batch_size]]), device,
                                           3 if smoke else 20, precision=cfg.precision, warmup=3)
        del model
        row = {"member": name, "images/epoch": images, "bare step img/s": bare, "epoch img/s": epoch_img_s,
               "steady img/s": steady, "shipped / bare": steady / bare,
               "one-off s": images / epoch_img_s - images / steady, "one-epoch run s": wall}
        if device.type == "cuda":
            row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(f"{name}: bare {bare:.0f}, epoch {epoch_img_s:.0f}, steady {steady:.0f} img/s, run {wall:.1f} s",
              flush=True)
    # twelve epochs: the one-off costs (first shapes, the crop cache) once, then 12 x (the rest of a one-epoch run:
    # every step at the steady rate, validation, checkpoints, the final scoring counted 12 times: an overestimate)
    projected = sum(r["one-off s"] + PAPER_EPOCHS * (r["one-epoch run s"] - r["one-off s"]) for r in rows)
    return {"rows": rows, "projected_protocol_minutes": projected / 60,
            "projection": "per member: the one-off costs of its one-epoch run once (first batch shapes, the first "
                          "member's crop cache), the rest of that run 12 times (steps at the steady rate, "
                          "validation, checkpoints, and the final scoring, which a real run pays once)"}


def section_infer(args: argparse.Namespace) -> dict:
    """Whole-ensemble cells/s: naive fp32 member by member vs the shipped engine (bf16 on a GPU); then the
    user's path, `alldetect ensemble` and `predict` on the paper runs."""
    import numpy as np
    import torch

    from alldetect.data.transforms import normalize
    from alldetect.models import create_member
    from alldetect.models.runtime import resolve_device, score_members

    smoke = args.smoke
    device = resolve_device(_device(smoke))
    names = _members(smoke)
    size = 64 if smoke else 300
    members = [create_member(n).eval().to(device) for n in names]
    shipped_members = [m.to(memory_format=torch.channels_last) for m in members]  # as TorchEngine holds them
    rows = []
    for batch in ((8, 16) if smoke else (64, 128, 256)):
        crops = np.random.default_rng(0).integers(0, 256, (batch * 4, size, size, 3), dtype=np.uint8)
        x = torch.from_numpy(crops[:batch]).permute(0, 3, 1, 2)

        def naive():
            with torch.no_grad():
                for m in members:
                    m.net(normalize(x, m.mean.cpu(), m.std.cpu()).to(device)).softmax(1).cpu()

        def shipped():  # what TorchEngine.member_probs runs, at this batch size
            score_members(shipped_members, crops, device=device, batch_size=batch)

        rows.append({"batch": batch, "naive fp32 cells/s": batch / _timed(naive),
                     "shipped engine cells/s": len(crops) / _timed(shipped)})
        print(rows[-1], flush=True)
    del members
    return {"members": names, "size": size, "rows": rows, "onnxruntime_cuda": _ort_cuda(names, size, smoke),
            "predict": _predict_end_to_end(args)}


def _predict_end_to_end(args: argparse.Namespace) -> dict:
    """`alldetect ensemble` on the paper section's runs, then `predict` on the data section's cells."""
    import torch

    from alldetect.data.images import read_rgb
    from alldetect.ensemble.build import build_ensemble
    from alldetect.inference.cells import read_cells
    from alldetect.inference.load import load_engine
    from alldetect.inference.predict import collect_inputs, predict_rows

    runs = sorted(p for p in (args.work / "paper-runs").iterdir() if p.is_dir())
    started = time.perf_counter()
    build_ensemble(runs, args.work / "ensemble")
    ensemble_s = time.perf_counter() - started
    engine = load_engine(args.work / "ensemble", device=_device(args.smoke))
    inputs = collect_inputs([args.work / "cells"])
    workers = min(8, os.cpu_count() or 1)
    started = time.perf_counter()
    read_cells(engine, [functools.partial(read_rgb, r.path) for r in inputs.rows], [r.path for r in inputs.rows],
               measure=True, workers=workers)
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    scored = predict_rows(engine, inputs, args.work / "predictions.csv")
    total_s = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"cells": scored.scored, "engine": type(engine).__name__, "tta": engine.uses_tta(),
            "ensemble_build_s": ensemble_s, "predict_s": total_s, "cells/s": scored.scored / total_s,
            "decode_and_measure_s": decode_s, "decode_share": decode_s / total_s, "decode_workers": workers}


def section_options(args: argparse.Namespace) -> dict:
    """The bare step compiled (CUDA graphs on a GPU) against eager, with the compile time."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from train_throughput import bare_step_images_per_second

    from alldetect.models import create_member
    from alldetect.models.runtime import resolve_device

    smoke = args.smoke
    device = resolve_device(_device(smoke))
    size, batch, steps = (64, 4, 3) if smoke else (300, PAPER_BATCH, 30)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    y = torch.arange(batch) % 2
    rows = []
    for name in ("mobilenet",):
        model = create_member(name).to(device).to(memory_format=torch.channels_last)
        eager = bare_step_images_per_second(model, x, y, device, steps, precision="auto", warmup=3)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        started = time.perf_counter()
        try:
            compiled = torch.compile(model, mode=mode)
            bare_step_images_per_second(model, x, y, device, 1, precision="auto", warmup=2, net=compiled)
            compile_s = time.perf_counter() - started
            fast = bare_step_images_per_second(model, x, y, device, steps, precision="auto", warmup=1, net=compiled)
        except Exception as e:  # the option's own failure is a finding, not a broken check
            rows.append({"member": name, "mode": mode, "eager img/s": eager,
                         "compiled": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        rows.append({"member": name, "mode": mode, "eager img/s": eager, "compiled img/s": fast,
                     "compiled / eager": fast / eager, "compile s": compile_s})
        print(rows[-1], flush=True)
    return {"batch": batch, "rows": rows}


def _ort_cuda(names: list[str], size: int, smoke: bool) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"status": f"onnxruntime not importable: {e}"}
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA libraries that came with torch's CUDA build
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": f"onnxruntime {ort.__version__} has no CUDA provider (onnxruntime-gpu is not installed, "
                          "or no GPU): the ONNX engine runs on the CPU here; the torch engine is the GPU path"}
    import numpy as np
    import torch

    from alldetect.data.geometry import Preprocess
    from alldetect.ensemble.combiners import SAP
    from alldetect.export.graph import export_onnx
    from alldetect.inference.torch_engine import TorchEngine
    from alldetect.models import create_member

    members = [create_member(n).eval() for n in names]
    model = TorchEngine(members, SAP([1.0] * len(members)), "sap", Preprocess(size), None, torch.device("cpu"),
                        "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "ensemble.onnx")
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        rows = []
        for batch in ((8,) if smoke else (64, 128, 256)):
            feed = {"images": np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
            rows.append({"batch": batch, "cells/s": batch / _timed(lambda: session.run(None, feed))})
    return {"status": "ok", "version": ort.__version__, "rows": rows}


SECTIONS = {"env": section_env, "data": section_data, "train": section_train, "paper": section_paper,
            "infer": section_infer, "options": section_options}


def _members(smoke: bool) -> list[str]:
    from alldetect.models.members import PAPER_MEMBERS

    return ["mobilenet", "densenet121"] if smoke else list(PAPER_MEMBERS)


def _timed(fn, repeats: int = 3) -> float:
    import torch

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def _device(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


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
             f"CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, {env.get('cpus', '?')} CPUs, free memory "
             f"{env.get('free_gib', 0):.1f} of {env.get('total_gib', 0):.1f} GiB; total "
             f"{results['total_seconds']:.0f} s.", "",
             "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']:.0f} |" for k, v in results.items() if k != "total_seconds"]
    data = results["data"]
    if data["status"] == "ok":
        lines += ["", f"Data: {data['distinct_frames']} distinct {data['frame_px']} px frames rendered in "
                      f"{data['render_s']:.1f} s; the paper-size set {data['paper_set']} and {data['predict_cells']} "
                      f"cells for predict linked in {data['link_s']:.1f} s."]
    train = results["train"]
    if train["status"] == "ok":
        profile = train["profile"]
        lines += ["", f"Profile of `fit()` (DenseNet-121, {profile['steps']} steps): "
                      f"{_num(profile['wall_ms_per_step'])} ms a step, device busy "
                      f"{_num(profile['device_busy_share'], '.0%')} of it; calls a step that wait for the device "
                      f"(aten::item also counts reads of host tensors): {profile['host_waits'] or 'none'}.", "",
                  _table(profile["top"]) if profile["top"] else ""]
    paper = results["paper"]
    if paper["status"] == "ok":
        lines += ["", "## The paper protocol: one real epoch of `fit()` per member, and its bare step", "",
                  "At the paper's batch (32) and input (300 px). *epoch*: over the whole epoch; *steady*: over its "
                  "second half; *shipped / bare*: steady against the bare step; *one-off*: what the epoch spent "
                  "beyond its steps at the steady rate (the first batch shapes, the last short batch).", "",
                  _table(paper["rows"]), "",
                  f"All five members x 12 epochs: **{paper['projected_protocol_minutes']:.1f} min** "
                  f"({paper['projection']})."]
    infer = results["infer"]
    if infer["status"] == "ok":
        lines += ["", f"## Ensemble inference ({', '.join(infer['members'])}, {infer['size']} px, cells/s)", "",
                  _table(infer["rows"]), "", f"onnxruntime CUDA: {infer['onnxruntime_cuda']['status']}"]
        if infer["onnxruntime_cuda"].get("rows"):
            lines += ["", _table(infer["onnxruntime_cuda"]["rows"])]
        p = infer["predict"]
        lines += ["", f"`alldetect ensemble` on the five paper runs: {p['ensemble_build_s']:.1f} s. `predict` end to "
                      f"end ({p['engine']}, TTA {'on' if p['tta'] else 'off'}): {p['cells']} cells in "
                      f"{p['predict_s']:.1f} s, **{p['cells/s']:.0f} cells/s**; decoding, cropping and the domain "
                      f"measures alone took {p['decode_and_measure_s']:.1f} s on {p['decode_workers']} threads "
                      f"({p['decode_share']:.0%} of it)."]
    options = results["options"]
    if options["status"] == "ok":
        lines += ["", f"## Options: the bare step compiled, batch {options['batch']}", "", _table(options["rows"])]
    return "\n".join(lines) + "\n"


def _num(value, fmt: str = ".1f") -> str:
    return "?" if value is None else format(value, fmt)


def _table(rows: list[dict]) -> str:
    columns = list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = (f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
