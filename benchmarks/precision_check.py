"""What reduced precision does to each member of a trained ensemble, on its own test cells.

For every member: the mean and largest change of P(ALL) under bf16 (torch autocast) and int8 (the exported
graph quantised with every member in int8, calibrated on the ensemble's validation crops as `alldetect export`
does), and the member's test AUC in fp32, bf16 and int8. Also what the ensemble's own bf16 check decided.

    python benchmarks/precision_check.py ENS_DIR
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np

from alldetect.data.cache import load_crops
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.evaluation.metrics import roc_auc
from alldetect.export.graph import export_onnx
from alldetect.export.quantize import quantize_graph
from alldetect.formats.predictions import read_predictions
from alldetect.formats.tables import format_table
from alldetect.inference.onnx_engine import OnnxEngine
from alldetect.inference.torch_engine import TorchEngine

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ens_dir", type=Path)
    args = parser.parse_args()
    folder = EnsembleFolder(args.ens_dir)
    model = TorchEngine.from_folder(folder, device="cpu", precision="fp32")
    test = next(iter(read_predictions(folder.predictions("test")).values()))
    tta = model.default_tta
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_crops(test.path, model.preprocess, cache_dir=tmp)
        crops, y = np.asarray(loaded.images)[loaded.usable], test.y[loaded.usable]
        fp32 = model.member_probs(crops, tta=tta)
        model.precision, model.fp32_members = "bf16", frozenset()  # every member in bf16, whatever the check said
        bf16 = model.member_probs(crops, tta=tta)
        graph = export_onnx(model, Path(tmp) / "ensemble.onnx")
        int8_path = quantize_graph(graph, Path(tmp) / "ensemble.int8.onnx", folder.calibration()[0])
        int8 = OnnxEngine.from_folder(folder, path=int8_path).member_probs(crops, tta=tta)
    rows = []
    for k, name in enumerate(model.names):
        row = {"member": name}
        for label, probs in (("bf16", bf16), ("int8", int8)):
            change = np.abs(probs[k] - fp32[k])
            row.update({f"{label} mean |dP|": change.mean(), f"{label} max |dP|": change.max()})
        rows.append({**row, "AUC fp32": roc_auc(y, fp32[k]), "AUC bf16": roc_auc(y, bf16[k]),
                     "AUC int8": roc_auc(y, int8[k])})
    print(f"{args.ens_dir}: {len(crops)} test cells, TTA {'on' if tta else 'off'}\n")
    print(format_table(rows, markdown=True, floats="{:.4f}"))
    verdict = folder.spec.bf16 or {}
    kept = ", ".join(verdict.get("fp32_members") or []) or "none"
    print(f"\nthe ensemble's bf16 check ({verdict.get('cells')} validation cells, tolerance "
          f"{verdict.get('tolerance')}): runs in fp32: {kept}")


if __name__ == "__main__":
    main()
