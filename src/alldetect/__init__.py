"""alldetect: acute lymphoblastic leukemia detection with a weighted ensemble of CNNs.

Packages, by stage (each imports only from those above it):

- ``errors``: every user-facing error, printed as one line; ``precision``: fp32/bf16/int8, the autocast rules and
  the tolerances.
- ``formats``: the file contracts (manifest, predictions, problems, labels and the 0.5 call, CSV, tables); no torch.
- ``data``: C-NMC names and images, indexing, subject splits, synthetic cells, the crop cache, the crop
  geometry (``Preprocess``), augmentation.
- ``models``: the member registry, and running members (device, batched scoring).
- ``evaluation``: metrics as the paper defines them, subject-level calls, bootstrap intervals, the baseline.
- ``training``: validated config and profiles, ``fit``, the run folder, schedules, sampler, distributed.
- ``ensemble``: registered combiners, the ensemble folder (``EnsembleFolder``) and its spec, building it from
  runs, the model card.
- ``inference``: the engine interface (torch, ONNX), scoring files, Grad-CAM.
- ``export``: the ONNX graph and its int8 copy.
- ``report``: tables and figures of an ensemble's results.
- ``serve``: the web page and JSON API.
- ``pipeline``: ``alldetect run``, every stage cached; ``api``: the library's front (``load``, ``train``, ``run``);
  ``cli``: parse, call the library, print.

The public names are imported from here, on first use (importing ``alldetect`` does not import torch)::

    import alldetect
    ensemble = alldetect.load("runs/demo/ensemble")
    cells = ensemble.predict(["a.bmp", "b.png"])     # a CellTable: cells.to_pandas(), cells.patients()
"""

__version__ = "0.1.0"
__all__ = ["CellTable", "Ensemble", "Table", "__version__", "load", "run", "train", "versions"]
_API = {"load": "api", "train": "api", "run": "api", "Ensemble": "api", "CellTable": "inference.table",
        "Table": "inference.table"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'alldetect' has no attribute {name!r}")


def versions() -> dict[str, str]:
    """What a result depends on, recorded with every run and ensemble: the libraries that shape the numbers (Pillow
    decodes and resizes the model input; onnxruntime runs the exported graphs, "absent" without the onnx extra),
    the platform, and the git commit of the source when it is a git checkout (with "+changes" when it differs)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "absent"

    return {"alldetect": __version__, "commit": _git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": installed("torchvision"), "timm": installed("timm"),
            "numpy": installed("numpy"), "pillow": installed("pillow"), "scikit-learn": installed("scikit-learn"),
            "onnxruntime": installed("onnxruntime"), "cuda": str(torch.version.cuda), "platform": platform.platform()}


def _git_commit() -> str:
    """The commit of the checkout this package runs from, or "" when it is not one (an installed wheel)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return ""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
