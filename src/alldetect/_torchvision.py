"""Make torchvision importable beside a CPU-only torch.

PyPI's torchvision wheels for x86-64 are linked against the CUDA build of torch. Beside a CPU-only
torch (the small install) their compiled operators cannot load, and torchvision then fails at import
with "operator torchvision::nms does not exist": it registers fake kernels for two operators that only
the compiled library declares. alldetect uses torchvision's transforms and the timm models built on
it, never its detection operators, so declaring those two schemas lets the import finish; calling the
operators still fails, with torchvision's own message. A working torchvision is left untouched.

Import this module before anything that imports torchvision (timm, pytorch_grad_cam).
"""

from __future__ import annotations

import sys

import torch

_FAKE_KERNEL_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[torch.library.Library] = []  # a Library withdraws its definitions when collected


def _import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::" not in str(error) or _declared:
            raise
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _FAKE_KERNEL_SCHEMAS:
            library.define(schema)
        _declared.append(library)
        import torchvision  # noqa: F401, F811


_import_torchvision()
