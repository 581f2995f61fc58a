"""The torch model of an :class:`~search.space.Architecture`: its backbone with attention
modules exactly where the architecture places them."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from search.nn.attention import create_attention
from search.nn.backbones import build_backbone
from search.nn.weights import load_backbone_weights, read_weights
from search.space import Architecture

# A built model's input and output, as exported models and bundles name them.
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def load_pretrained(
    model: nn.Module, architecture: Architecture, path: str | Path, keep_head: bool = True
) -> set[str]:
    """Load the backbone weights of file ``path`` into ``model`` (built for ``architecture``;
    its classifier too where it fits, unless not ``keep_head``); returns the keys loaded.
    InvalidValue at ``backbone_weights`` naming what does not fit."""
    state = read_weights(path)
    return load_backbone_weights(model, state, architecture.info, str(path), keep_head)


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
