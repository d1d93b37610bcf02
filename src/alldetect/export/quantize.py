"""Static int8 quantisation of the exported ensemble graph, calibrated on validation cells.

Weights become int8 per output channel, activations uint8 with ranges taken from the members' own
activations on validation crops (never test cells: the test split stays untouched for evaluation).
Each member's softmax and the combiner stay in float, and so does a member whose probabilities int8 moves
too far on those cells (some networks are far more sensitive than others). On CPUs with AVX-512 VNNI,
onnxruntime runs the int8 graph several times faster than fp32 (BENCHMARKS.md); ``alldetect export``
reports how far its probabilities move from the fp32 graph.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..ensemble.folder import EnsembleFolder
from ..errors import AlldetectError
from ..evaluation.metrics import roc_auc
from ..inference.onnx_engine import OnnxEngine
from ..inference.predict import collect_inputs, load_crops_for
from ..precision import INT8_TOLERANCE
from .graph import graph_metadata, replace_graph_metadata

logger = logging.getLogger(__name__)


def quantize_graph(fp32_path: str | Path, out: str | Path, calibration: np.ndarray, *,
                   input_dtype: str = "uint8", batch_size: int = 4, float_members: list[int] = ()) -> Path:
    """Write a static int8 (QDQ) copy of the ONNX graph at ``fp32_path``, calibrated on ``calibration``,
    uint8 crops (N, S, S, 3) fed through the graph's ``images`` input. Members (by position) listed in
    ``float_members`` stay fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise AlldetectError("int8 calibration needs at least one cell")
    batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
    if input_dtype == "float32":
        batches = [b.astype(np.float32) / 255 for b in batches]

    class Cells(CalibrationDataReader):
        """Batch by batch: with a stride of one batch, onnxruntime merges each batch's ranges and drops its
        activations, so memory stays at one batch's worth whatever the number of cells."""

        def __init__(self):
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds = iter({"images": np.ascontiguousarray(b)} for b in batches[start_index:end_index])

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        float_nodes = _float_nodes(prepared, float_members)
        with _root_info_silenced():
            quantize_static(str(prepared), str(out), Cells(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=float_nodes,
                            extra_options={"CalibStridedMinMax": 1, "QDQOpTypePerChannelSupportToAxis": {
                                "BatchNormalization": 0}})  # its scale is one value per channel
    quantised = onnx.load(str(out))  # finished in one pass: float inputs back, then the metadata
    _float_inputs_restored(quantised, float_nodes)
    replace_graph_metadata(quantised, graph_metadata(fp32_path) | {"precision": "int8",
                                                                   "float_members": json.dumps(list(float_members))})
    onnx.save(quantised, str(out))
    return out


@contextlib.contextmanager
def _root_info_silenced():
    """onnxruntime's quantiser logs a line per rescaled weight channel (a thousand for a small ensemble) with
    the root logger's ``logging.info``; its warnings still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _float_nodes(path: Path, float_members: list[int]) -> list[str]:
    """Names of the nodes that stay float: every softmax and every node it feeds (probabilities, the average of a
    member's fold models, and the combiner: uint8 would round P(ALL) to steps of 1/255), and every node of the
    ``float_members``."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    consumers: dict[str, list] = {}
    producer = {out: node for node in nodes for out in node.output}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    softmaxes = [_softmax_behind(producer, name) for name in _member_columns(producer)]
    keep = _reachable([node for node in nodes if node.op_type == "Softmax"],
                      lambda node: (c for out in node.output for c in consumers.get(out, [])))
    keep |= _reachable([softmaxes[k] for k in float_members],
                       lambda node: (producer[i] for i in node.input if i in producer))
    return sorted(keep)


def _float_inputs_restored(model, float_nodes: list[str]) -> None:
    """Feed the float nodes the float tensors again. Members with the same normalisation share its nodes in the
    exported graph, and the quantiser gives every reader of a tensor it quantises the dequantised copy: a member
    kept in fp32 would otherwise see its input rounded to 8 bits."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep = set(float_nodes)
    for node in model.graph.node:
        if node.name not in keep:
            continue
        for k, name in enumerate(node.input):
            dequantize = producer.get(name)
            quantize = dequantize is not None and dequantize.op_type == "DequantizeLinear" and \
                producer.get(dequantize.input[0])
            if quantize and quantize.op_type == "QuantizeLinear":
                node.input[k] = quantize.input[0]


def _member_columns(producer: dict) -> list[str]:
    """The tensors holding each member's P(ALL), in member order: the inputs of the Concat that makes
    ``member_prob_all`` (the output itself for a one-member ensemble; none for a single network's graph)."""
    output = producer.get("member_prob_all")
    if output is None:
        return []
    return list(output.input) if output.op_type == "Concat" else ["member_prob_all"]


def _softmax_behind(producer: dict, tensor: str):
    """The softmax node a member's column of ``member_prob_all`` comes from (through Gather, Unsqueeze)."""
    node = producer[tensor]
    while node.op_type != "Softmax":
        node = producer[next(i for i in node.input if i in producer)]
    return node


def _reachable(start: list, neighbours) -> set[str]:
    frontier, seen = list(start), set()
    while frontier:
        node = frontier.pop()
        if node.name not in seen:
            seen.add(node.name)
            frontier.extend(neighbours(node))
    return seen


def calibration_crops(folder: EnsembleFolder | str | Path, model, *, calibration: list[Path] | None = None,
                      cells: int = 128) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Crops to calibrate int8 on, their labels (None for given images) and where they came from: up to
    ``cells`` of ``calibration`` images, or by default the validation crops kept in the ensemble folder."""
    if calibration:
        crops, _ = load_crops_for(model, collect_inputs(calibration).rows[:cells], {})
        return crops, None, "given"
    crops, labels = EnsembleFolder.of(folder).calibration()
    return crops[:cells], labels[:cells], "validation"


@dataclass
class Int8Summary:
    """Where the int8 graph went and how far it moves the ensemble's P(ALL) from fp32 on its calibration cells."""
    path: Path
    cells: int
    source: str                # "validation" (the ensemble folder's sample) or "given"
    float_members: list[str]   # members int8 moved too far: fp32 inside the graph
    mean_change: float
    max_change: float
    auc_fp32: float | None     # on labelled calibration cells of both classes
    auc_int8: float | None

    def describe(self) -> str:
        """One line: where, calibrated on what, and how far it moves P(ALL) from fp32."""
        auc = f"; AUC {self.auc_fp32:.4f} -> {self.auc_int8:.4f}" if self.auc_fp32 is not None else ""
        kept = f"; kept fp32: {', '.join(self.float_members)}" if self.float_members else ""
        return (f"wrote {self.path} ({self.path.stat().st_size / 1e6:.0f} MB), calibrated on {self.cells} "
                f"{self.source} cells; on those cells int8 moves the ensemble's P(ALL) by {self.mean_change:.4f} "
                f"on average, {self.max_change:.4f} at most{auc}{kept}")


def quantize_ensemble(folder: EnsembleFolder | str | Path, fp32_path: str | Path, model, crops: np.ndarray,
                      labels: np.ndarray | None = None, *, source: str = "validation", input_dtype: str = "uint8",
                      tolerance: float = INT8_TOLERANCE) -> Int8Summary | None:
    """Write ``<fp32 graph>.int8.onnx`` calibrated on ``crops`` (see ``calibration_crops``). A member whose
    P(ALL) int8 moves by more than ``tolerance`` on average over those cells stays fp32 in that graph; when
    that is every member, no int8 graph is written (returns None). Returns where it went and how far int8
    moves the ensemble's P(ALL) on those cells."""
    folder, fp32_path = EnsembleFolder.of(folder), Path(fp32_path)
    out = fp32_path.with_suffix(".int8.onnx")
    folder.record_graph(out, written=False)
    fp32 = OnnxEngine.from_folder(folder, method=model.method, path=fp32_path).member_probs(crops)
    float_members: list[int] = []
    while True:
        quantize_graph(fp32_path, out, crops, input_dtype=input_dtype, float_members=float_members)
        int8 = OnnxEngine.from_folder(folder, method=model.method, path=out).member_probs(crops)
        drift = np.abs(int8 - fp32).mean(axis=1)
        too_far = [k for k in np.flatnonzero(drift > tolerance).tolist() if k not in float_members]
        if not too_far:
            break
        for k in too_far:
            logger.warning("%s: int8 moves its P(ALL) by %.3f on average over %d %s cells (tolerance %.3f); "
                           "it stays fp32", model.names[k], drift[k], len(crops), source, tolerance)
        float_members += too_far
        if len(float_members) == len(model.names):
            out.unlink()
            return None
    folder.record_graph(out, written=True)
    ens32, ens8 = model.combiner.apply(fp32), model.combiner.apply(int8)
    both_classes = labels is not None and len(set(labels.tolist())) == 2
    return Int8Summary(out, len(crops), source, [model.names[k] for k in float_members],
                       float(np.abs(ens8 - ens32).mean()), float(np.abs(ens8 - ens32).max()),
                       roc_auc(labels, ens32) if both_classes else None,
                       roc_auc(labels, ens8) if both_classes else None)
