"""The attention module for a block's slot, by name (as timm's ``create_attn`` does)."""

from __future__ import annotations

from torch import nn

from search.knobs import CBAMConfig, check_attention
from search.nn.cbam import CBAM
from search.nn.squeeze_excite import SqueezeExcite


def create_attention(
    kind: str, channels: int, config: CBAMConfig | None = None, se_reduction: int = 16
) -> nn.Module:
    """``none`` (identity), ``se`` (squeeze-and-excitation) or ``cbam`` for ``channels``."""
    kind = check_attention(kind)
    if kind == "se":
        return SqueezeExcite(channels, se_reduction)
    if kind == "cbam":
        return CBAM(channels, config)
    return nn.Identity()
