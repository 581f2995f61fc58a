"""CBAM (Woo et al., ECCV 2018), its knobs, and squeeze-and-excitation as the reference attention.

``CBAM`` computes ``out = x * A[b, c] * S[b, h, w]``: a channel gate ``A`` (the "what") and a
spatial gate ``S`` (the "where"). Its cost is memory traffic, not arithmetic, so the module runs as
one autograd function (:class:`_FusedGates`) that touches the full-size feature map only a
handful of times: pooling in a few fused reductions and matrix-vector products, one gated multiply,
and a backward pass that saves only ``x`` plus tiny tensors (pooled descriptors, gates, argmax
indices). The small sub-networks (the shared MLP, the k x k spatial convolution and its BatchNorm)
are recomputed in backward from the saved descriptors and differentiated by
``torch.autograd.grad``.
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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search.errors import InvalidValue

ARRANGEMENTS = ("channel-spatial", "spatial-channel", "parallel", "channel", "spatial")
POOL_TYPES = ("avg", "max", "lp", "lse")
SPATIAL_POOLS = ("maxmean", "conv")
KERNEL_SIZES = (1, 3, 5, 7, 9)
ATTENTION_KINDS = ("none", "se", "cbam")

# The authors' spatial BatchNorm: momentum 0.01, gamma and beta start at 0 (gate exactly 0.5).
_AUTHORS_BN_MOMENTUM = 0.01
# Widths up to this use the banded-matrix spatial convolution; wider maps use F.conv2d.
_BANDED_CONV_MAX_WIDTH = 64


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


def _flat(x: Tensor) -> Tensor:
    """A (B, C, H*W) view of a contiguous or channels_last 4-d tensor, without copying."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(b, c, h * w)
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
    return x.contiguous().view(b, c, h * w)


def _banded_conv(maps: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(maps, weight, padding=k // 2)`` for a 1-output-channel conv over a few maps.

    oneDNN's convolution is slow for 1-2 channels, above all in backward (several ms for a 7x7 on
    64 maps of 32x32). Here the width direction is folded into a banded W x W matrix per (map, row
    offset) and the conv becomes one matrix product over windows of k rows: dense BLAS work in both
    directions, ~10x faster at CIFAR/ImageNet stage widths.
    """
    b, m, h, w = maps.shape
    k = weight.shape[-1]
    pad = k // 2
    offsets = torch.arange(w, device=maps.device)
    tap = offsets.view(w, 1) - offsets.view(1, w) + pad  # tap[w_in, w_out]
    inside = (tap >= 0) & (tap < k)
    band = weight[0][:, :, tap.clamp(0, k - 1)] * inside  # (m, k, w_in, w_out)
    rows = F.pad(maps, (0, 0, pad, pad)).unfold(2, k, 1)  # (b, m, h, w_in, k)
    windows = rows.permute(0, 2, 1, 4, 3).reshape(b * h, m * k * w)
    out = windows @ band.reshape(m * k * w, w)
    return out.view(b, h, 1, w).transpose(1, 2)


def spatial_conv(maps: Tensor, weight: Tensor) -> Tensor:
    if maps.shape[-1] <= _BANDED_CONV_MAX_WIDTH and weight.shape[-1] > 1:
        return _banded_conv(maps, weight)
    return F.conv2d(maps, weight, padding=weight.shape[-1] // 2)


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


@dataclass
class _Saved:
    """What the fused forward keeps for backward besides ``x``: only small tensors."""

    gate_c: Tensor | None = None  # (B, C) float32
    gate_s: Tensor | None = None  # (B, H*W) float32
    pooled: Tensor | None = None  # (T, B, C) float32
    maps: Tensor | None = None  # (B, M, H, W) float32
    hw_argmax: Tensor | None = None  # (B, C) flat h*W+w of the max over H x W
    c_argmax: Tensor | None = None  # (B, H*W) channel of the max over C
    lp_norm: Tensor | None = None
    lse: Tensor | None = None


def _pool_hw(x: Tensor, channel: ChannelGate, saved: _Saved) -> Tensor:
    """Channel-gate pooling with what backward needs; (T, B, C) in the gate's dtype."""
    out = []
    for p in channel.pool_types:
        if p == "avg":
            v = x.mean((2, 3))
        elif p == "max":
            v, idx = F.adaptive_max_pool2d(x, 1, return_indices=True)
            v, saved.hw_argmax = v.flatten(1), idx.flatten(1)
        elif p == "lp":
            v = saved.lp_norm = torch.linalg.vector_norm(x, 2, dim=(2, 3))
        else:
            v = saved.lse = torch.logsumexp(_flat(x), 2)
        out.append(v.to(channel.fc1.weight.dtype))
    return torch.stack(out)


def _pool_c(y: Tensor, gate: SpatialGate, saved: _Saved) -> Tensor:
    """Spatial-gate pooling across channels with what backward needs; (B, M, H, W), gate dtype."""
    b, c, h, w = y.shape
    dtype = gate.conv.weight.dtype
    yf = _flat(y)
    if gate.pool_conv is not None:
        weight = gate.pool_conv.weight.view(1, 1, c).to(y.dtype).expand(b, 1, c)
        return torch.bmm(weight, yf).view(b, 1, h, w).to(dtype)
    # adaptive_max_pool1d over the (B, H*W, C) view: a vectorised max with indices for NCHW.
    mx, idx = F.adaptive_max_pool1d(yf.transpose(1, 2), 1, return_indices=True)
    saved.c_argmax = idx.view(b, h * w)
    mx = mx.view(b, 1, h, w).to(dtype)
    mean = y.mean(1, keepdim=True).to(dtype)
    return torch.cat([mean, mx] if gate.mean_first else [mx, mean], 1)


def _split_maps(d_maps: Tensor, gate: SpatialGate) -> tuple[Tensor | None, Tensor]:
    """Gradient of the pooled maps -> (d_max, d_linear) as (B, H*W) each (d_max None for conv)."""
    d = d_maps.flatten(2)
    if gate.pool_conv is not None:
        return None, d[:, 0]
    d_mean, d_max = (d[:, 0], d[:, 1]) if gate.mean_first else (d[:, 1], d[:, 0])
    return d_max, d_mean


def _storage(t: Tensor) -> Tensor:
    """A 1-d view of a dense tensor's storage (contiguous or channels_last), for flat offsets."""
    return t.as_strided((t.numel(),), (1,))


def _offsets_hw(t: Tensor, hw_index: Tensor) -> Tensor:
    """Storage offsets of t[b, c, hw_index[b, c]] (flat h*W+w), for either dense layout."""
    b, c = hw_index.shape
    sb, sc, _, sw = t.stride()
    base = torch.arange(b, device=t.device).view(b, 1) * sb
    return base + torch.arange(c, device=t.device).view(1, c) * sc + hw_index * sw


def _offsets_c(t: Tensor, c_index: Tensor) -> Tensor:
    """Storage offsets of t[b, c_index[b, n], n] (n = h*W+w), for either dense layout."""
    b, n = c_index.shape
    sb, sc, _, sw = t.stride()
    base = torch.arange(b, device=t.device).view(b, 1) * sb
    return base + c_index * sc + torch.arange(n, device=t.device).view(1, n) * sw


def _scatter_add(t: Tensor, offsets: Tensor, values: Tensor) -> None:
    _storage(t).index_add_(0, offsets.view(-1), values.reshape(-1).to(t.dtype))


class _FusedGates(torch.autograd.Function):
    """out = x * A * S for every arrangement, in few passes over x; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: CBAM, *params: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out, saved = _fused_forward(x, module)
        ctx.module = module
        ctx.saved = saved
        ctx.param_count = len(params)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx, param_grads = _fused_backward(x, grad_out, ctx.module, ctx.saved)
        grads = [param_grads.get(p) for p in ctx.module.fused_parameters()]
        return (dx, None, *grads)


def _channel_gate(channel: ChannelGate, pooled: Tensor) -> Tensor:
    return torch.sigmoid(channel.logits(pooled))


def _spatial_gate(spatial: SpatialGate, maps: Tensor, update_stats: bool) -> Tensor:
    return torch.sigmoid(spatial.logits(maps, update_stats)).flatten(1)


def _fused_forward(x: Tensor, m: CBAM) -> tuple[Tensor, _Saved]:
    saved = _Saved()
    b, c, h, w = x.shape
    arrangement = m.config.arrangement
    channel, spatial = m.channel_gate, m.spatial_gate
    gate_c = gate_s = None
    if arrangement in ("channel-spatial", "parallel", "channel"):
        saved.pooled = _pool_hw(x, channel, saved)
        gate_c = saved.gate_c = _channel_gate(channel, saved.pooled)
    if arrangement == "channel-spatial":
        y = x * gate_c.to(x.dtype).view(b, c, 1, 1)
        saved.maps = _pool_c(y, spatial, saved)
        gate_s = saved.gate_s = _spatial_gate(spatial, saved.maps, True)
        return y.mul_(gate_s.to(x.dtype).view(b, 1, h, w)), saved
    if arrangement in ("spatial-channel", "parallel", "spatial"):
        saved.maps = _pool_c(x, spatial, saved)
        gate_s = saved.gate_s = _spatial_gate(spatial, saved.maps, True)
    if arrangement == "spatial-channel":
        z = x * gate_s.to(x.dtype).view(b, 1, h, w)
        saved.pooled = _pool_hw(z, channel, saved)
        gate_c = saved.gate_c = _channel_gate(channel, saved.pooled)
        return z.mul_(gate_c.to(x.dtype).view(b, c, 1, 1)), saved
    if gate_c is None:
        return x * gate_s.to(x.dtype).view(b, 1, h, w), saved
    if gate_s is None:
        return x * gate_c.to(x.dtype).view(b, c, 1, 1), saved
    out = x * gate_c.to(x.dtype).view(b, c, 1, 1)
    return out.mul_(gate_s.to(x.dtype).view(b, 1, h, w)), saved


def _small_backward(
    fn: Any, inp: Tensor, params: list[Tensor], grad: Tensor, grads: dict[Tensor, Tensor]
) -> Tensor:
    """Recompute a small sub-network from its saved input and backpropagate ``grad`` through it.

    Returns the gradient of the input; parameter gradients are accumulated into ``grads``.
    """
    params = [p for p in params if p is not None and p.requires_grad]
    with torch.enable_grad():
        leaf = inp.detach().requires_grad_()
        out = fn(leaf)
        got = torch.autograd.grad(out, [leaf, *params], grad.to(out.dtype))
    for p, g in zip(params, got[1:], strict=True):
        grads[p] = grads[p] + g if p in grads else g
    return got[0]


def _channel_pool_grad_terms(
    d_pooled: Tensor, pool_types: tuple[str, ...], saved: _Saved, hw: int
) -> dict[str, Tensor]:
    terms = dict(zip(pool_types, d_pooled, strict=True))
    if "avg" in terms:
        terms["avg"] = terms["avg"] / hw
    if "lp" in terms:
        norm = saved.lp_norm.to(terms["lp"].dtype)
        terms["lp"] = torch.where(norm > 0, terms["lp"] / norm.clamp_min(1e-30), 0.0)
    return terms


def _fused_backward(
    x: Tensor, g: Tensor, m: CBAM, saved: _Saved
) -> tuple[Tensor, dict[Tensor, Tensor]]:
    """dx and parameter gradients of ``out = x * A * S`` for the module's arrangement.

    Reductions over channels run as (1 x C) @ (C x HW) products, reductions over positions as
    sums of an in-place product; max pooling adds its gradient at the saved argmax offsets.
    """
    b, c, h, w = x.shape
    dt = x.dtype
    arrangement = m.config.arrangement
    channel, spatial = m.channel_gate, m.spatial_gate
    grads: dict[Tensor, Tensor] = {}
    gate_c = saved.gate_c.to(dt).view(b, c, 1, 1) if saved.gate_c is not None else None
    gate_s = saved.gate_s.to(dt).view(b, 1, h, w) if saved.gate_s is not None else None

    def spatial_backward(d_gate_s: Tensor) -> tuple[Tensor | None, Tensor]:
        d_maps = _small_backward(
            lambda maps: _spatial_gate(spatial, maps, False),
            saved.maps,
            [spatial.conv.weight, *_bn_params(spatial)],
            d_gate_s,
            grads,
        )
        d_max, d_lin = _split_maps(d_maps, spatial)
        return d_max, d_lin.to(dt).view(b, 1, h, w)

    def channel_backward(d_gate_c: Tensor) -> dict[str, Tensor]:
        d_pooled = _small_backward(
            lambda pooled: _channel_gate(channel, pooled),
            saved.pooled,
            list(channel.parameters()),
            d_gate_c,
            grads,
        )
        return _channel_pool_grad_terms(d_pooled, channel.pool_types, saved, h * w)

    def sum_c(t: Tensor, weight: Tensor) -> Tensor:
        """sum_c t[b, c, hw] * weight[b, c] as (B, H*W)."""
        return torch.bmm(weight.reshape(b, 1, c).to(dt), _flat(t)).view(b, h * w)

    prod = torch.mul(g, x, out=torch.empty_like(x))
    if arrangement == "channel":
        terms = channel_backward(prod.sum((2, 3)))
        dx = torch.mul(g, gate_c, out=prod)
        return _finish_channel_terms(dx, x, terms, saved, None), grads
    if arrangement == "spatial":
        d_max, d_lin = spatial_backward(prod.sum(1).reshape(b, h * w))
        dx = torch.mul(g, gate_s, out=prod)
        _finish_spatial_terms(dx, x, d_max, d_lin, spatial, saved, grads)
        return dx, grads

    d_gate_s = sum_c(prod, gate_c)
    if arrangement == "channel-spatial":
        d_max, d_lin = spatial_backward(d_gate_s)
        # Spatial pooling read y = x * A, so A also gets x * dy summed over positions, and
        # dx = A * (G * S + dy) + the channel pooling's terms; t holds G * S + dy (dense part).
        t = torch.empty_like(x)
        if spatial.pool_conv is None:
            torch.addcmul(d_lin / c, g, gate_s, out=t)
        else:
            pool_w = spatial.pool_conv.weight.view(1, c, 1, 1).to(dt)
            torch.mul(g, gate_s, out=t).addcmul_(pool_w, d_lin)
            q = (x * d_lin).sum((2, 3))
            grads[spatial.pool_conv.weight] = (q * gate_c.view(b, c)).sum(0).view_as(pool_w)
        d_gate_c = torch.mul(x, t, out=prod).sum((2, 3))
        if d_max is not None:
            offsets = _offsets_c(x, saved.c_argmax)
            x_at = _storage(x)[offsets]
            c_offsets = torch.arange(b, device=x.device).view(b, 1) * c + saved.c_argmax
            d_gate_c.view(-1).index_add_(0, c_offsets.view(-1), (d_max.to(dt) * x_at).view(-1))
        terms = channel_backward(d_gate_c)
        dx = _finish_channel_terms(t, x, terms, saved, gate_c)
        if d_max is not None:
            gate_at = saved.gate_c.gather(1, saved.c_argmax)
            _scatter_add(dx, offsets, d_max * gate_at)
        return dx, grads

    d_gate_c = prod.mul_(gate_s).sum((2, 3))
    if arrangement == "spatial-channel":
        terms = channel_backward(d_gate_c)
        # Channel pooling read z = x * S, so S also gets x * dz summed over channels, and
        # dx = S * (G * A + dz) + the spatial pooling's terms.
        extra = _channel_extra_grad(x, terms, saved, gate_s)
        if "avg" in terms:
            d_gate_s = d_gate_s + sum_c(x, terms["avg"])
        if "max" in terms:
            offsets = _offsets_hw(x, saved.hw_argmax)
            hw_offsets = torch.arange(b, device=x.device).view(b, 1) * (h * w) + saved.hw_argmax
            x_at = _storage(x)[offsets]
            d_gate_s.view(-1).index_add_(
                0, hw_offsets.view(-1), (terms["max"].to(dt) * x_at).view(-1)
            )
        if extra is not None:
            d_gate_s = d_gate_s + (extra * x).sum(1).view(b, h * w)
        d_max, d_lin = spatial_backward(d_gate_s)
        t = prod
        if "avg" in terms:
            torch.addcmul(terms["avg"].to(dt).view(b, c, 1, 1), g, gate_c, out=t)
        else:
            torch.mul(g, gate_c, out=t)
        if extra is not None:
            t.add_(extra)
        dx = t.mul_(gate_s)
        if "max" in terms:
            gate_at = saved.gate_s.gather(1, saved.hw_argmax)
            _scatter_add(dx, offsets, terms["max"] * gate_at)
        _finish_spatial_terms(dx, x, d_max, d_lin, spatial, saved, grads)
        return dx, grads

    # parallel: both gates read x itself.
    terms = channel_backward(d_gate_c)
    d_max, d_lin = spatial_backward(d_gate_s)
    dx = _finish_channel_terms(torch.mul(g, gate_s, out=prod), x, terms, saved, gate_c)
    _finish_spatial_terms(dx, x, d_max, d_lin, spatial, saved, grads)
    return dx, grads


def _bn_params(spatial: SpatialGate) -> list[Tensor]:
    return [spatial.bn.weight, spatial.bn.bias] if spatial.bn is not None else []


def _channel_extra_grad(
    x: Tensor, terms: dict[str, Tensor], saved: _Saved, scale: Tensor | None
) -> Tensor | None:
    """The full-size gradient terms of lp and lse pooling (of ``x * scale``), or None."""
    if "lp" not in terms and "lse" not in terms:
        return None
    b, c = x.shape[:2]
    z = x if scale is None else x * scale
    extra = torch.zeros_like(x)
    if "lp" in terms:
        extra.addcmul_(z, terms["lp"].to(x.dtype).view(b, c, 1, 1))
    if "lse" in terms:
        soft = (z - saved.lse.to(x.dtype).view(b, c, 1, 1)).exp_()
        extra.addcmul_(soft, terms["lse"].to(x.dtype).view(b, c, 1, 1))
    return extra


def _finish_channel_terms(
    t: Tensor, x: Tensor, terms: dict[str, Tensor], saved: _Saved, gate_c: Tensor | None
) -> Tensor:
    """dx = t * A + (gradient of the channel pooling of x), written into ``t``."""
    b, c = x.shape[:2]
    avg = terms["avg"].to(x.dtype).view(b, c, 1, 1) if "avg" in terms else None
    if gate_c is not None and avg is not None:
        torch.addcmul(avg, t, gate_c, out=t)
    elif gate_c is not None:
        t.mul_(gate_c)
    elif avg is not None:
        t.add_(avg)
    if "max" in terms:
        _scatter_add(t, _offsets_hw(t, saved.hw_argmax), terms["max"])
    extra = _channel_extra_grad(x, terms, saved, None)
    if extra is not None:
        t.add_(extra)
    return t


def _finish_spatial_terms(
    dx: Tensor,
    x: Tensor,
    d_max: Tensor | None,
    d_lin: Tensor,
    spatial: SpatialGate,
    saved: _Saved,
    grads: dict[Tensor, Tensor],
) -> None:
    """dx += gradient of the spatial pooling of x itself (parallel, spatial-only, s->c)."""
    c = x.shape[1]
    if spatial.pool_conv is not None:
        weight = spatial.pool_conv.weight
        q = (x * d_lin).sum((2, 3))
        grads[weight] = q.to(weight.dtype).sum(0).view_as(weight)
        dx.addcmul_(weight.view(1, c, 1, 1).to(x.dtype), d_lin)
        return
    dx.add_(d_lin / c)
    _scatter_add(dx, _offsets_c(dx, saved.c_argmax), d_max)


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

    def fused_parameters(self) -> list[Tensor]:
        return list(self.parameters())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or torch.compiler.is_compiling():
            return reference_forward(self, x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        params = self.fused_parameters()
        if not torch.is_grad_enabled() or not (
            x.requires_grad or any(p.requires_grad for p in params)
        ):
            out, _ = _fused_forward(x, self)
            return out
        return _FusedGates.apply(x, self, *params)

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
