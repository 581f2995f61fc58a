"""CBAM's two gates, as plain definitions: the channel gate Mc ("what") and the spatial gate Ms
("where") of Woo et al. (ECCV 2018), section 3.

:class:`~search.nn.cbam.CBAM` holds one of each (or one, for the single-gate arrangements) and
composes them; its fast CPU paths (:mod:`search.nn.cbam_fused`, :mod:`search.nn.cbam_kernels`)
read their parameters and compute the same function with fewer passes over the feature map.
:class:`GatedModule` names what those paths read of a CBAM module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search.knobs import CBAMConfig

# The authors' spatial BatchNorm: momentum 0.01, gamma and beta start at 0 (gate exactly 0.5).
_AUTHORS_BN_MOMENTUM = 0.01


class ChannelGate(nn.Module):
    """Mc: pool over H x W per pool type, one shared MLP C -> C/r -> ReLU -> C, sum, sigmoid."""

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        pool_types: Sequence[str] = ("avg", "max"),
        mlp_bias: bool = True,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden or max(1, channels // reduction)
        self.pool_types = tuple(pool_types)
        self.fc1 = nn.Linear(channels, hidden, bias=mlp_bias)
        self.fc2 = nn.Linear(hidden, channels, bias=mlp_bias)

    def logits(self, pooled: Tensor) -> Tensor:
        """(T, B, C) pooled descriptors -> (B, C) gate logits (each descriptor through the MLP)."""
        return self.fc2(F.relu(self.fc1(pooled))).sum(0)

    def pool(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (T, B, C), one descriptor per pool type."""
        out = []
        for p in self.pool_types:
            if p == "avg":
                out.append(x.mean((2, 3)))
            elif p == "max":
                out.append(x.amax((2, 3)))
            elif p == "lp":
                out.append(x.square().sum((2, 3)).sqrt())
            else:
                out.append(torch.logsumexp(x.flatten(2), 2))
        return torch.stack(out)

    def gate(self, x: Tensor) -> Tensor:
        """The channel gate A, (B, C, 1, 1), in x's dtype."""
        logits = self.logits(self.pool(x).to(self.fc1.weight.dtype))
        return torch.sigmoid(logits).to(x.dtype)[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class SpatialGate(nn.Module):
    """Ms: pool across channels (max & mean, or a learned 1x1 conv), k x k conv, BN, sigmoid."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        spatial_pool: str = "maxmean",
        spatial_bn: bool = True,
        mean_first: bool = False,
        authors_bn_init: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_pool = spatial_pool
        self.mean_first = mean_first
        maps = 2 if spatial_pool == "maxmean" else 1
        self.pool_conv = nn.Conv2d(channels, 1, 1, bias=False) if spatial_pool == "conv" else None
        self.conv = nn.Conv2d(maps, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn: nn.BatchNorm2d | None = None
        if spatial_bn:
            if authors_bn_init:
                self.bn = nn.BatchNorm2d(1, momentum=_AUTHORS_BN_MOMENTUM)
                nn.init.zeros_(self.bn.weight)
            else:
                self.bn = nn.BatchNorm2d(1)

    def pool(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, M, H, W) pooled maps."""
        if self.pool_conv is not None:
            return F.conv2d(x, self.pool_conv.weight)
        mx, mean = x.amax(1, keepdim=True), x.mean(1, keepdim=True)
        return torch.cat([mean, mx] if self.mean_first else [mx, mean], 1)

    def logits(self, maps: Tensor, update_stats: bool = True) -> Tensor:
        """(B, M, H, W) pooled maps -> (B, 1, H, W) gate logits.

        ``update_stats=False`` computes a training-mode forward with the batch statistics but
        leaves the running statistics alone (for looking at the gate without changing it).
        """
        z = self.conv(maps)
        bn = self.bn
        if bn is None:
            return z
        if not bn.training:
            return F.batch_norm(
                z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        if update_stats:
            return bn(z)
        return F.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    def gate(self, x: Tensor, update_stats: bool = True) -> Tensor:
        """The spatial gate S, (B, 1, H, W), in x's dtype."""
        logits = self.logits(self.pool(x).to(self.conv.weight.dtype), update_stats)
        return torch.sigmoid(logits).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class GatedModule(Protocol):
    """What the fast paths read of a CBAM module (:class:`search.nn.cbam.CBAM`)."""

    config: CBAMConfig
    channel_gate: ChannelGate | None
    spatial_gate: SpatialGate | None
    _modules: dict[str, nn.Module | None]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
