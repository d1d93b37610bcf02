"""Grad-CAM (Selvaraju et al. 2017, with the ``grad-cam`` package) for every member and for the ensemble.

Each member's map is computed at its registered target layer for one class (by default the class the
ensemble predicts), upsampled to the crop and min-max scaled to [0, 1] by the package. The ensemble's
map is the weighted mean of the members' maps with the ensemble's member weights (see
``TorchEngine.cam_weights``): sum_k W_k CAM_k / sum_k W_k, the image-space counterpart of Eq. 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .. import _torchvision  # noqa: F401  (first: lets torchvision import beside a CPU-only torch)
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from ..ensemble.combiners import combiner_label
from ..ensemble.folder import EnsembleFolder
from ..errors import AlldetectError
from ..formats.labels import Label, call, is_all
from .engine import Scores
from .predict import collect_inputs, load_crops_for
from .torch_engine import TorchEngine

logger = logging.getLogger(__name__)


def member_cams(model: TorchEngine, crops: np.ndarray, classes: list[int]) -> np.ndarray:
    """(members, N, S, S) Grad-CAM maps in [0, 1] for uint8 crops (N, S, S, 3) and target classes."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(255).to(model.device)
    targets = [ClassifierOutputTarget(c) for c in classes]
    maps = []
    for member in model.members:
        with GradCAM(model=member, target_layers=member.cam_layers) as cam:
            maps.append(cam(input_tensor=x, targets=targets))
    return np.stack(maps).astype(np.float32)


def ensemble_cam(cams: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k W_k CAM_k / sum_k W_k over the members axis.

    >>> ensemble_cam(np.array([[[1.0, 0.0]], [[0.0, 0.0]]]), np.array([3.0, 1.0])).tolist()
    [[0.75, 0.0]]
    """
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), cams, axes=1)


def overlay(crop: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map as a heat overlay on the uint8 RGB crop."""
    return show_cam_on_image(crop.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.6)


def _unique_stems(names: list[str]) -> list[str]:
    """File stems for the overlays; cells that share a file name (from different folders) get their row number
    so that no overlay overwrites another.

    >>> _unique_stems(["a/x.png", "b/x.png", "c/y.png"])
    ['x_row1', 'x_row2', 'y']
    """
    stems = [Path(n).stem for n in names]
    return [f"{s}_row{i + 1}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]


@dataclass
class CellCams:
    """Grad-CAM of a batch of cells: the class each map explains, the scores, and the maps in [0, 1]."""
    classes: list[int]
    scores: Scores
    members: np.ndarray   # (members, N, S, S)
    ensemble: np.ndarray  # (N, S, S)


def cell_cams(model: TorchEngine, crops: np.ndarray, *, target: str = "predicted") -> CellCams:
    """Maps of every member and of the ensemble for uint8 crops, explaining ``target``: the class the ensemble
    predicts (scored as the ensemble was fitted, with or without TTA), ``all`` or ``hem``."""
    scores = model.predict(crops)
    if target == "predicted":
        classes = is_all(scores.ensemble).astype(int).tolist()
    else:
        classes = [int(Label.from_text(target))] * len(crops)
    members = member_cams(model, crops, classes)
    return CellCams(classes, scores, members, ensemble_cam(members, model.cam_weights))


def explain_files(folder: EnsembleFolder | str | Path, paths: list[str | Path], out: str | Path, *,
                  method: str | None = None, device: str = "auto", target: str = "predicted",
                  rows_per_grid: int | None = None) -> list[Path]:
    """Grad-CAM grids (``explain``) of the cell images at ``paths``, with the ensemble's torch engine (Grad-CAM
    needs gradients); unreadable images are warned about and left out. With ``rows_per_grid`` the cells are
    split into grids of that many rows, in numbered subfolders of ``out``. Returns the grid paths."""
    model = TorchEngine.from_folder(folder, method=method, device=device)
    collected = collect_inputs(paths)
    errors = dict(collected.errors)
    crops, kept = load_crops_for(model, collected.rows, errors)
    for path, reason in errors.items():
        logger.warning("%s: %s (skipped)", path, reason)
    if not kept:
        raise AlldetectError("none of the images could be read")
    names = [collected.rows[i].path for i in kept]
    if rows_per_grid is None:
        return [explain(model, crops, names, out, target=target)]
    return [explain(model, crops[s:s + rows_per_grid], names[s:s + rows_per_grid],
                    Path(out) / f"batch{s // rows_per_grid:04d}", target=target)
            for s in range(0, len(names), rows_per_grid)]


def explain(model: TorchEngine, crops: np.ndarray, names: list[str], out: str | Path, *,
            target: str = "predicted") -> Path:
    """Write one overlay PNG per cell and member, and ``gradcam_grid.png`` (rows: cells; columns: the
    members and the ensemble, titled with predicted class and probability). Returns the grid path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cams = cell_cams(model, crops, target=target)
    classes = cams.classes
    columns = model.names + [combiner_label(model.method)]
    probs = np.vstack([cams.scores.members, cams.scores.ensemble[None]])
    all_maps = np.concatenate([cams.members, cams.ensemble[None]])
    fig = Figure(figsize=(2.0 * (len(columns) + 1), 2.1 * len(crops)))
    axes = fig.subplots(len(crops), len(columns) + 1, squeeze=False)
    stems = _unique_stems(names)
    for i, name in enumerate(names):
        axes[i, 0].imshow(crops[i])
        axes[i, 0].set_title(f"{Path(name).name[:22]}\ntarget: {'ALL' if classes[i] else 'HEM'}", fontsize=7)
        for k, column in enumerate(columns):
            picture = overlay(crops[i], all_maps[k, i])
            Image.fromarray(picture).save(out / f"{stems[i]}_{column.replace(' ', '_')}.png")
            verdict = call(probs[k, i])
            axes[i, k + 1].imshow(picture)
            axes[i, k + 1].set_title(f"{column}\n{verdict} {probs[k, i]:.2f}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    grid = out / "gradcam_grid.png"
    fig.savefig(grid, dpi=110)
    return grid

