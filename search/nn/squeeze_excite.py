"""Squeeze-and-excitation (Hu et al., CVPR 2018): the paper's reference attention."""

from __future__ import annotations

from search.knobs import CBAMConfig
from search.nn.cbam import CBAM


class SqueezeExcite(CBAM):
    """Exactly CBAM's channel gate with average pooling alone, so it runs CBAM's fast paths."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(
            channels, CBAMConfig(reduction=reduction, pool_types=("avg",), arrangement="channel")
        )
