"""The whole ensemble as one ONNX graph, with the metadata an engine needs to run it.

Graph input ``images``: a batch of cropped RGB cells, NHWC, uint8 (0-255) or float32 (0-1), dynamic batch.
Outputs ``prob_all`` (N,) of the ensemble and ``member_prob_all`` (N, members). Each member's own
normalisation and the ensemble's combiner are inside the graph.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import AlldetectError
from ..ensemble.folder import GRAPH_METADATA_PREFIX
from ..inference.torch_engine import TorchEngine

logger = logging.getLogger(__name__)


class EnsembleGraph(nn.Module):
    """Members plus combiner as one module, for export."""

    def __init__(self, model: TorchEngine):
        super().__init__()
        self.members = nn.ModuleList(model.members)
        self.combiner = model.combiner

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2)
        probs = torch.stack([m(x).softmax(dim=1)[:, 1] for m in self.members], dim=1)  # (N, K)
        return self.combiner.forward(probs), probs


def export_onnx(model: TorchEngine, out: str | Path, *, input_dtype: str = "uint8", opset: int = 18) -> Path:
    """Export ``model`` (on CPU, fp32) to ``out`` and record members and method in the graph's metadata."""

    if input_dtype not in ("uint8", "float32"):
        raise AlldetectError(f"input dtype must be uint8 or float32, not {input_dtype!r}")
    out = Path(out)
    graph = EnsembleGraph(model).cpu().float().eval()
    side = model.preprocess.side
    example = torch.zeros(2, side, side, 3, dtype=torch.uint8 if input_dtype == "uint8" else torch.float32)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # inside torch.export
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                    output_names=["prob_all", "member_prob_all"], dynamic_shapes=({0: batch},),
                                    verbose=False)
    program.save(str(out))
    set_graph_metadata(out, {"members": json.dumps(model.names), "method": model.method,
                             "preprocess": json.dumps(model.preprocess.to_json()), "input_dtype": input_dtype,
                             "precision": "fp32"})
    return out


def graph_metadata(path: str | Path) -> dict[str, str]:
    """The alldetect entries of an ONNX graph's metadata, without their prefix."""
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    prefix = GRAPH_METADATA_PREFIX
    return {p.key.removeprefix(prefix): p.value for p in props if p.key.startswith(prefix)}


def set_graph_metadata(path: str | Path, meta: dict[str, str]) -> None:
    """Replace the metadata of the graph file at ``path`` with ``meta`` (see ``replace_graph_metadata``)."""
    import onnx

    proto = onnx.load(str(path))
    replace_graph_metadata(proto, meta)
    onnx.save(proto, str(path))


def replace_graph_metadata(proto, meta: dict[str, str]) -> None:
    """Replace a loaded graph's metadata with ``meta`` (keys get the alldetect prefix)."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = GRAPH_METADATA_PREFIX + key, value
