"""The torch model of an :class:`~search.space.Architecture`: its backbone with attention
modules exactly where the architecture places them."""

from __future__ import annotations

from torch import nn

from search.nn.attention import create_attention
from search.nn.backbones import build_backbone
from search.space import Architecture

# The state-dict keys of every backbone's first convolution and classifier: num_classes is the
# classifier's rows, in_channels the stem's input channels.
STEM_WEIGHT = "conv1.weight"
CLASSIFIER_WEIGHT = "fc.weight"
# A built model's input and output, as exported models and bundles name them.
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def build_model(architecture: Architecture, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The backbone with attention modules exactly where ``architecture`` places them."""
    if architecture.attention == "none":
        return build_backbone(architecture.backbone, num_classes, in_channels)
    config = architecture.cbam_config()
    se_reduction = architecture.reduction or 16

    def factory(stage: int, block: int, channels: int) -> nn.Module:
        if not architecture.attends(stage, block):
            return nn.Identity()
        return create_attention(architecture.attention, channels, config, se_reduction)

    return build_backbone(architecture.backbone, num_classes, in_channels, factory)
