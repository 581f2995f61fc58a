"""CBAM (Woo et al., ECCV 2018), its knobs, and squeeze-and-excitation as the reference attention.

``CBAM`` computes ``out = x * A[b, c] * S[b, h, w]``: a channel gate ``A`` (the "what") and a
spatial gate ``S`` (the "where"). Its cost is memory traffic, not arithmetic, so training runs it
as one autograd function (:mod:`search.nn.cbam_fused`) that touches the full-size feature map a
handful of times and keeps only ``x`` and tiny tensors for backward.
``reference_forward`` is the plain, line-by-line definition; tests hold the fused path to it in
float64, forward and gradients.

Arrangements (``CBAMConfig.arrangement``):

- ``channel-spatial`` (the paper): ``F' = Mc(F) * F``, ``F'' = Ms(F') * F'``.
- ``spatial-channel``: ``F' = Ms(F) * F``, ``F'' = Mc(F') * F'``.
- ``parallel`` (not defined by the paper; our definition): both gates from the same input,
  ``F'' = F * Mc(F) * Ms(F)``.
- ``channel`` (channel gate only; with average pooling alone this is squeeze-and-excitation) and
  ``spatial`` (spatial gate only).

Under ``torch.compile`` the module falls back to the plain definition, which Inductor fuses itself.
On CUDA (and any device but the CPU) it runs the plain definition too: there the cost at the sizes
CNNs use is the number of kernel launches, not the bytes, and the fused path's hand-written
backward launches more kernels than autograd does over the plain ops (measured on an H200, every
block shape and precision of ``benchmarks/gpu.py``: ~4.0 ms against ~2.9 ms per forward+backward,
and whole trials 28% faster with the plain definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search.errors import InvalidValue
from search.nn.cbam_fused import (
    FusedGates,
    forget_kernel_plan,
    fused_forward,
    kernel_forward,
    kernel_route,
    spatial_conv,
)

ARRANGEMENTS = ("channel-spatial", "spatial-channel", "parallel", "channel", "spatial")
POOL_TYPES = ("avg", "max", "lp", "lse")
SPATIAL_POOLS = ("maxmean", "conv")
KERNEL_SIZES = (1, 3, 5, 7, 9)
ATTENTION_KINDS = ("none", "se", "cbam")

# The authors' spatial BatchNorm: momentum 0.01, gamma and beta start at 0 (gate exactly 0.5).
_AUTHORS_BN_MOMENTUM = 0.01


def has_channel_gate(arrangement: str) -> bool:
    return arrangement != "spatial"


def has_spatial_gate(arrangement: str) -> bool:
    return arrangement != "channel"


@dataclass(frozen=True)
class CBAMConfig:
    """Every knob of one CBAM module. The defaults are the paper's module as the authors coded it.

    ``timm_compat`` reproduces timm's ``CbamModule`` (mean-first concatenation, hidden width
    rounded half up, BatchNorm starting at gamma 1 with momentum 0.1); use
    :meth:`CBAMConfig.timm`, which also turns the MLP bias off as timm does.
    """

    reduction: int = 16
    pool_types: tuple[str, ...] = ("avg", "max")
    kernel_size: int = 7
    spatial_pool: str = "maxmean"
    spatial_bn: bool = True
    mlp_bias: bool = True
    arrangement: str = "channel-spatial"
    timm_compat: bool = False

    def __post_init__(self) -> None:
        if self.arrangement not in ARRANGEMENTS:
            raise InvalidValue("arrangement", self.arrangement, ARRANGEMENTS)
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int):
            raise InvalidValue("reduction", self.reduction, "an integer >= 1")
        if self.reduction < 1:
            raise InvalidValue("reduction", self.reduction, "an integer >= 1")
        pools = tuple(self.pool_types)
        if not pools:
            raise InvalidValue("pool_types", pools, f"a non-empty subset of {POOL_TYPES}")
        for i, p in enumerate(pools):
            if p not in POOL_TYPES:
                raise InvalidValue(f"pool_types[{i}]", p, POOL_TYPES)
        if len(set(pools)) != len(pools):
            raise InvalidValue("pool_types", pools, "each of avg, max, lp, lse at most once")
        object.__setattr__(self, "pool_types", pools)
        if self.kernel_size not in KERNEL_SIZES or isinstance(self.kernel_size, bool):
            raise InvalidValue("kernel_size", self.kernel_size, "an odd size: 1, 3, 5, 7, 9")
        if self.spatial_pool not in SPATIAL_POOLS:
            raise InvalidValue("spatial_pool", self.spatial_pool, SPATIAL_POOLS)

    @classmethod
    def timm(cls, **overrides: Any) -> CBAMConfig:
        """The setting under which :class:`CBAM` equals timm's ``CbamModule`` given its weights."""
        return cls(**{"mlp_bias": False, "timm_compat": True, **overrides})

    def hidden_channels(self, channels: int) -> int:
        if self.timm_compat:
            return max(1, int(channels / self.reduction + 0.5))
        return max(1, channels // self.reduction)


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
        """The plain pooling, (B, C, H, W) -> (T, B, C)."""
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
        """The plain pooling, (B, C, H, W) -> (B, M, H, W)."""
        if self.pool_conv is not None:
            return F.conv2d(x, self.pool_conv.weight)
        mx, mean = x.amax(1, keepdim=True), x.mean(1, keepdim=True)
        return torch.cat([mean, mx] if self.mean_first else [mx, mean], 1)

    def logits(self, maps: Tensor, update_stats: bool = True) -> Tensor:
        """(B, M, H, W) pooled maps -> (B, 1, H, W) gate logits.

        ``update_stats=False`` recomputes a training-mode forward with the batch statistics but
        leaves the running statistics alone (used when backward recomputes the gate).
        """
        z = spatial_conv(maps, self.conv.weight)
        bn = self.bn
        if bn is None:
            return z
        if not bn.training:
            return F.batch_norm(
                z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        if update_stats:
            bn.num_batches_tracked.add_(1)
            return F.batch_norm(
                z, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps
            )
        return F.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    def gate(self, x: Tensor, update_stats: bool = True) -> Tensor:
        """The spatial gate S, (B, 1, H, W), in x's dtype."""
        logits = self.logits(self.pool(x).to(self.conv.weight.dtype), update_stats)
        return torch.sigmoid(logits).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Convolutional Block Attention Module with every knob of :class:`CBAMConfig`."""

    def __init__(self, channels: int, config: CBAMConfig | None = None) -> None:
        super().__init__()
        config = config or CBAMConfig()
        self.channels = channels
        self.config = config
        self.channel_gate: ChannelGate | None = None
        self.spatial_gate: SpatialGate | None = None
        if has_channel_gate(config.arrangement):
            self.channel_gate = ChannelGate(
                channels,
                config.reduction,
                config.pool_types,
                config.mlp_bias,
                hidden=config.hidden_channels(channels),
            )
        if has_spatial_gate(config.arrangement):
            self.spatial_gate = SpatialGate(
                channels,
                config.kernel_size,
                config.spatial_pool,
                config.spatial_bn,
                mean_first=config.timm_compat,
                authors_bn_init=not config.timm_compat,
            )

    def _apply(self, fn: Any, recurse: bool = True) -> CBAM:
        forget_kernel_plan(self)  # a cast or move changes the tensors' dtype or device in place
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or torch.compiler.is_compiling() or x.device.type != "cpu":
            return reference_forward(self, x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        route = kernel_route(x, self)
        if route is not None:
            kernels, plan = route
            grad = torch.is_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in plan.params)
            )
            return kernel_forward(kernels, x, plan, grad)
        params = list(self.parameters())
        if not torch.is_grad_enabled() or not (
            x.requires_grad or any(p.requires_grad for p in params)
        ):
            out, _ = fused_forward(x, self, for_backward=False)
            return out
        return FusedGates.apply(x, self, *params)

    @torch.no_grad()
    def gates(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The channel gate (B, C) and spatial gate (B, H, W) this module applies to ``x``.

        For looking inside the attention (the dashboard's maps); leaves BatchNorm statistics alone.
        """
        channel, spatial = self.channel_gate, self.spatial_gate
        arrangement = self.config.arrangement
        gate_c = gate_s = None
        if arrangement in ("channel-spatial", "parallel", "channel"):
            gate_c = channel.gate(x)
        if arrangement in ("spatial-channel", "parallel", "spatial"):
            gate_s = spatial.gate(x, update_stats=False)
        if arrangement == "channel-spatial":
            gate_s = spatial.gate(x * gate_c, update_stats=False)
        if arrangement == "spatial-channel":
            gate_c = channel.gate(x * gate_s)
        return (
            gate_c.flatten(1) if gate_c is not None else None,
            gate_s[:, 0] if gate_s is not None else None,
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"{self.channels}, arrangement={cfg.arrangement}, reduction={cfg.reduction}, "
            f"pool_types={'+'.join(cfg.pool_types)}, kernel_size={cfg.kernel_size}, "
            f"spatial_pool={cfg.spatial_pool}"
        )


def reference_forward(module: CBAM, x: Tensor) -> Tensor:
    """The plain definition of :class:`CBAM` with ordinary autograd ops (tests, torch.compile)."""
    channel, spatial = module.channel_gate, module.spatial_gate
    arrangement = module.config.arrangement
    if arrangement == "channel":
        return channel(x)
    if arrangement == "spatial":
        return spatial(x)
    if arrangement == "channel-spatial":
        return spatial(channel(x))
    if arrangement == "spatial-channel":
        return channel(spatial(x))
    return x * channel.gate(x) * spatial.gate(x)


class SqueezeExcite(CBAM):
    """Squeeze-and-excitation (Hu et al. 2018): the paper's reference attention.

    Exactly CBAM's channel gate with average pooling alone, so it runs through the same fused path.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(
            channels, CBAMConfig(reduction=reduction, pool_types=("avg",), arrangement="channel")
        )


def create_attention(
    kind: str, channels: int, config: CBAMConfig | None = None, se_reduction: int = 16
) -> nn.Module:
    """The attention module for a block slot: ``none`` (identity), ``se`` or ``cbam``."""
    if kind == "none":
        return nn.Identity()
    if kind == "se":
        return SqueezeExcite(channels, se_reduction)
    if kind == "cbam":
        return CBAM(channels, config)
    raise InvalidValue("attention", kind, ATTENTION_KINDS)
