"""Grad-CAM (Selvaraju et al. 2017, with the ``grad-cam`` package) for every member and for the ensemble.

Each member's map is computed at its registered target layer for one class (by default the class the
ensemble predicts), upsampled to the crop and min-max scaled to [0, 1] by the package. The ensemble's
map is the weighted mean of the members' maps with the ensemble's member weights (see
``EnsembleModel.cam_weights``): sum_k W_k CAM_k / sum_k W_k, the image-space counterpart of Eq. 2.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .. import _torchvision  # noqa: E402, F401  (first: lets torchvision import beside a CPU-only torch)
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from ..ensemble.combiners import METHOD_LABELS  # noqa: E402
from .torch_engine import EnsembleModel  # noqa: E402


def member_cams(model: EnsembleModel, crops: np.ndarray, classes: list[int]) -> np.ndarray:
    """(members, N, S, S) Grad-CAM maps in [0, 1] for uint8 crops (N, S, S, 3) and target classes."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(255).to(model.device)
    targets = [ClassifierOutputTarget(c) for c in classes]
    maps = []
    for member in model.members:
        with GradCAM(model=member, target_layers=[member.cam_layer]) as cam:
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


def explain(model: EnsembleModel, crops: np.ndarray, names: list[str], out: str | Path, *,
            target: str = "predicted") -> Path:
    """Write one overlay PNG per cell and member, and ``gradcam_grid.png`` (rows: cells; columns: the
    members and the ensemble, titled with predicted class and probability). Returns the grid path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ens_prob, member_prob = model.predict(crops, tta=model.default_tta)
    if target == "predicted":
        classes = [int(p >= 0.5) for p in ens_prob]
    else:
        classes = [1 if target == "all" else 0] * len(crops)
    cams = member_cams(model, crops, classes)
    combined = ensemble_cam(cams, model.cam_weights)
    columns = model.names + [METHOD_LABELS.get(model.method, model.method)]
    probs = np.vstack([member_prob, ens_prob[None]])
    all_maps = np.concatenate([cams, combined[None]])
    fig, axes = plt.subplots(len(crops), len(columns) + 1, figsize=(2.0 * (len(columns) + 1), 2.1 * len(crops)),
                             squeeze=False)
    stems = _unique_stems(names)
    for i, name in enumerate(names):
        axes[i, 0].imshow(crops[i])
        axes[i, 0].set_title(f"{Path(name).name[:22]}\ntarget: {'ALL' if classes[i] else 'HEM'}", fontsize=7)
        for k, column in enumerate(columns):
            picture = overlay(crops[i], all_maps[k, i])
            Image.fromarray(picture).save(out / f"{stems[i]}_{column.replace(' ', '_')}.png")
            call = "ALL" if probs[k, i] >= 0.5 else "HEM"
            axes[i, k + 1].imshow(picture)
            axes[i, k + 1].set_title(f"{column}\n{call} {probs[k, i]:.2f}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    grid = out / "gradcam_grid.png"
    fig.savefig(grid, dpi=110)
    plt.close(fig)
    return grid

