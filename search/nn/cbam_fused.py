"""The fast path of :class:`search.nn.cbam.CBAM`: one autograd function for ``out = x * A * S``.

CBAM costs memory traffic, not arithmetic: the plain definition (and timm's module) makes ~240
read+write passes over the feature map for forward+backward, most of them in the backward of
``amax`` and of the broadcast multiplies. Here:

- forward pools with fused reductions (mean, max with indices) and a (1 x C) @ (C x HW) product,
  materialises ``x * A`` once and gates it in place: ~6 passes;
- backward saves only ``x`` and tiny tensors (pooled descriptors, gates, argmax indices) and
  derives every gradient from ``g * x`` and ``g * S`` products, with max pooling adding its
  gradient at the saved argmax offsets: ~12 passes;
- the small sub-networks (shared MLP, k x k spatial conv, BatchNorm(1), sigmoids) get hand-written
  backward passes from what forward kept, not a second autograd graph: on CIFAR-sized maps the
  per-op overhead, not the bytes, is what remains.

The k x k convolution over the 1-2 pooled maps is a banded matrix product
(:mod:`search.nn.banded_conv`): oneDNN's convolution is slowest exactly there.

This path runs on the CPU for every knob and dtype the compiled kernels
(:mod:`search.nn.cbam_kernels`) do not cover: half precision, the other arrangements and pool
types, or no compiler. CUDA takes neither: ``CBAM.forward`` runs the plain definition there (see
:mod:`search.nn.cbam`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from search.nn.banded_conv import spatial_conv, spatial_conv_backward
from search.nn.gates import ChannelGate, GatedModule, SpatialGate


def flat(x: Tensor) -> Tensor:
    """A (B, C, H*W) view of a contiguous or channels_last 4-d tensor, without copying."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(b, c, h * w)
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
    return x.contiguous().view(b, c, h * w)


@lru_cache(maxsize=256)
def _arange(n: int, step: int, device: torch.device) -> Tensor:
    return torch.arange(0, n * step, step, device=device)


_workspaces = threading.local()


def _workspace(like: Tensor) -> Tensor:
    """A scratch tensor shaped and laid out like ``like``, reused across calls on this thread.

    Fresh multi-megabyte CPU tensors are page-faulted in on every allocation (glibc hands them back
    to the OS on free); one reused buffer per shape avoids that in the backward pass.
    """
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (like.shape, like.stride(), like.dtype, like.device)
    buf = cache.get(key)
    if buf is None:
        if len(cache) >= 16:
            cache.clear()
        buf = cache[key] = torch.empty_like(like)
    return buf


def _storage(t: Tensor) -> Tensor:
    """A 1-d view of a dense tensor's storage (contiguous or channels_last), for flat offsets."""
    return t.as_strided((t.numel(),), (1,))


def _offsets_hw(t: Tensor, hw_index: Tensor) -> Tensor:
    """Storage offsets of t[b, c, hw_index[b, c]] (flat h*W+w), for either dense layout."""
    b, c = hw_index.shape
    sb, sc, _, sw = t.stride()
    base = _arange(b, sb, t.device).view(b, 1) + _arange(c, sc, t.device).view(1, c)
    return hw_index.mul(sw).add_(base)


def _offsets_c(t: Tensor, c_index: Tensor) -> Tensor:
    """Storage offsets of t[b, c_index[b, n], n] (n = h*W+w), for either dense layout."""
    b, n = c_index.shape
    sb, sc, _, sw = t.stride()
    base = _arange(b, sb, t.device).view(b, 1) + _arange(n, sw, t.device).view(1, n)
    return c_index.mul(sc).add_(base)


def _scatter_add(t: Tensor, offsets: Tensor, values: Tensor) -> None:
    _storage(t).index_add_(0, offsets.view(-1), values.reshape(-1).to(t.dtype))


def _max_with_index(v: Tensor) -> tuple[Tensor, Tensor]:
    """Max and argmax over the last dimension of a (N, K, L) view, as (N, K) each.

    CPU kernels find a max with its index fast only when the reduced dimension is strided and
    the kept one contiguous (a vectorised pooling kernel); reducing along the contiguous
    dimension runs a scalar loop ~10x slower than a full copy. So lay the data out that way first.
    """
    if v.stride(-1) == 1 and v.shape[-1] > 1 and v.device.type == "cpu":
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    mx, idx = F.adaptive_max_pool1d(v, 1, return_indices=True)
    return mx.squeeze(-1), idx.squeeze(-1)


def _max_hw(x: Tensor) -> tuple[Tensor, Tensor]:
    """Max over H x W with the flat index of its first occurrence, (B, C) each.

    On large contiguous NCHW maps the transposing copy costs more than a two-step search: row
    maxima (vectorised, no index), the best row, then the one row that holds the maximum.
    """
    b, c, h, w = x.shape
    if not (x.is_contiguous() and h * w >= 256 and x.device.type == "cpu"):
        return _max_with_index(flat(x))
    v, row = x.amax(3).max(2)
    rows = x.view(b * c, h, w)[_arange(b * c, 1, x.device), row.view(-1)]
    return v, row.mul_(w).add_(rows.argmax(1).view(b, c))


@dataclass
class _ChannelState:
    """Forward results of the channel gate that its backward needs (all (T|1, B, C|hidden))."""

    pooled: Tensor
    hidden: Tensor  # MLP pre-activation, (T, B, hidden)
    gate: Tensor  # A, (B, C)
    hw_argmax: Tensor | None = None
    lp_norm: Tensor | None = None
    lse: Tensor | None = None


@dataclass
class _SpatialState:
    """Forward results of the spatial gate that its backward needs."""

    maps: Tensor  # pooled maps, (B, M, H, W)
    conv_out: Tensor  # before BatchNorm, (B, 1, H, W)
    gate: Tensor  # S, (B, H*W)
    c_argmax: Tensor | None = None
    bn_mean: Tensor | None = None
    bn_invstd: Tensor | None = None
    bn_training: bool = False


def _channel_forward(x: Tensor, gate: ChannelGate, indices: bool = True) -> _ChannelState:
    dtype = gate.fc1.weight.dtype
    state: dict[str, Tensor] = {}
    pooled = []
    for p in gate.pool_types:
        if p == "avg":
            v = x.mean((2, 3))
        elif p == "max":
            if indices:
                v, state["hw_argmax"] = _max_hw(x)
            else:
                v = x.amax((2, 3))
        elif p == "lp":
            v = state["lp_norm"] = torch.linalg.vector_norm(x, 2, dim=(2, 3))
        else:
            v = state["lse"] = torch.logsumexp(flat(x), 2)
        pooled.append(v)
    stacked = torch.stack(pooled).to(dtype)
    hidden = F.linear(stacked, gate.fc1.weight, gate.fc1.bias)
    activated = F.relu(hidden).sum(0)
    if gate.fc2.bias is None:
        logits = activated @ gate.fc2.weight.t()
    else:
        logits = torch.addmm(gate.fc2.bias * len(pooled), activated, gate.fc2.weight.t())
    return _ChannelState(stacked, hidden, torch.sigmoid(logits), **state)


def _channel_backward(
    d_gate: Tensor, state: _ChannelState, gate: ChannelGate, grads: dict[Tensor, Tensor]
) -> Tensor:
    """Backward of pool-descriptors -> MLP -> sum -> sigmoid; returns d(pooled), (T, B, C)."""
    fc1, fc2 = gate.fc1, gate.fc2
    d_logits = torch.ops.aten.sigmoid_backward(d_gate.to(state.gate.dtype), state.gate)
    activated = F.relu(state.hidden)
    grads[fc2.weight] = d_logits.t() @ activated.sum(0)
    if fc2.bias is not None:
        grads[fc2.bias] = d_logits.sum(0).mul_(state.hidden.shape[0])
    d_activated = (d_logits @ fc2.weight).expand_as(state.hidden)
    d_hidden = torch.ops.aten.threshold_backward(d_activated, state.hidden, 0)
    t, b, c = state.pooled.shape
    grads[fc1.weight] = d_hidden.reshape(t * b, -1).t() @ state.pooled.view(t * b, c)
    if fc1.bias is not None:
        grads[fc1.bias] = d_hidden.sum((0, 1))
    return d_hidden @ fc1.weight


def _spatial_forward(y: Tensor, gate: SpatialGate, indices: bool = True) -> _SpatialState:
    """Pool y across channels, conv, BatchNorm, sigmoid; keeps what backward needs.

    ``indices=False`` (no backward will follow) skips the argmax, which costs more than the max.
    """
    b, c, h, w = y.shape
    dtype = gate.conv.weight.dtype
    c_argmax = None
    yf = flat(y)
    if gate.pool_conv is not None:
        weight = gate.pool_conv.weight.view(1, 1, c).to(y.dtype).expand(b, 1, c)
        maps = torch.bmm(weight, yf).view(b, 1, h, w).to(dtype)
    else:
        if indices:
            mx, c_argmax = _max_with_index(yf.transpose(1, 2))
        else:
            mx = y.amax(1, keepdim=True)
        mean = y.mean(1, keepdim=True)
        pair = (mean, mx.view(b, 1, h, w)) if gate.mean_first else (mx.view(b, 1, h, w), mean)
        maps = torch.cat(pair, 1).to(dtype)
    conv_out = spatial_conv(maps, gate.conv.weight)
    state = _SpatialState(maps, conv_out, conv_out, c_argmax)
    logits = conv_out
    bn = gate.bn
    if bn is not None:
        state.bn_training = bn.training
        if bn.training:
            track = bn.running_mean is not None
            if track:
                bn.num_batches_tracked.add_(1)
            logits, state.bn_mean, state.bn_invstd = torch.native_batch_norm(
                conv_out,
                bn.weight,
                bn.bias,
                bn.running_mean if track else None,
                bn.running_var if track else None,
                True,
                bn.momentum,
                bn.eps,
            )
        else:
            logits = F.batch_norm(
                conv_out, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
    state.gate = torch.sigmoid(logits).view(b, h * w)
    return state


def _spatial_backward(
    d_gate: Tensor, state: _SpatialState, gate: SpatialGate, grads: dict[Tensor, Tensor]
) -> Tensor:
    """Backward of maps -> conv -> BatchNorm -> sigmoid; returns d(maps), (B, M, H, W)."""
    b, _, h, w = state.maps.shape
    d_logits = torch.ops.aten.sigmoid_backward(d_gate.to(state.gate.dtype), state.gate)
    d_logits = d_logits.view(b, 1, h, w)
    bn = gate.bn
    if bn is not None:
        d_logits, d_bn_weight, d_bn_bias = torch.ops.aten.native_batch_norm_backward(
            d_logits,
            state.conv_out,
            bn.weight,
            bn.running_mean,
            bn.running_var,
            state.bn_mean,
            state.bn_invstd,
            state.bn_training,
            bn.eps,
            [True, bn.weight.requires_grad, bn.bias.requires_grad],
        )
        grads[bn.weight], grads[bn.bias] = d_bn_weight, d_bn_bias
    d_maps, grads[gate.conv.weight] = spatial_conv_backward(d_logits, state.maps, gate.conv.weight)
    return d_maps


@dataclass
class _PoolGrads:
    """Gradient of the channel descriptors split by pool type, ready to be spread over x."""

    avg: Tensor | None = None  # already divided by H*W
    max: Tensor | None = None
    lp: Tensor | None = None  # already divided by the norm
    lse: Tensor | None = None

    @classmethod
    def of(cls, d_pooled: Tensor, state: _ChannelState, pool_types: tuple[str, ...], hw: int):
        terms = dict(zip(pool_types, d_pooled, strict=True))
        if "avg" in terms:
            terms["avg"] = terms["avg"] / hw
        if "lp" in terms:
            norm = state.lp_norm.to(terms["lp"].dtype)
            terms["lp"] = torch.where(norm > 0, terms["lp"] / norm.clamp_min(1e-30), 0.0)
        return cls(**terms)

    def dense(self, x: Tensor, state: _ChannelState, scale: Tensor | None) -> Tensor | None:
        """The full-size part of lp and lse pooling's gradient (pooling ``x * scale``)."""
        if self.lp is None and self.lse is None:
            return None
        b, c = x.shape[:2]
        z = x if scale is None else x * scale
        out = torch.zeros_like(x)
        if self.lp is not None:
            out.addcmul_(z, self.lp.to(x.dtype).view(b, c, 1, 1))
        if self.lse is not None:
            soft = (z - state.lse.to(x.dtype).view(b, c, 1, 1)).exp_()
            out.addcmul_(soft, self.lse.to(x.dtype).view(b, c, 1, 1))
        return out


def _split_maps(d_maps: Tensor, gate: SpatialGate, dtype: torch.dtype):
    """d(maps) -> (d_max (B, H*W) or None, d_linear (B, 1, H, W)) in the activation dtype."""
    b, _, h, w = d_maps.shape
    if gate.pool_conv is not None:
        return None, d_maps.to(dtype)
    d_mean, d_max = (
        (d_maps[:, 0], d_maps[:, 1]) if gate.mean_first else (d_maps[:, 1], d_maps[:, 0])
    )
    return d_max.reshape(b, h * w), d_mean.to(dtype).view(b, 1, h, w)


@dataclass
class Saved:
    """What the fused forward keeps besides ``x``: only small tensors."""

    channel: _ChannelState | None = None
    spatial: _SpatialState | None = None


def fused_forward(x: Tensor, m: GatedModule, for_backward: bool = True) -> tuple[Tensor, Saved]:
    """``out = x * A * S``; with ``for_backward=False`` (inference) no argmax is kept."""
    b, c, h, w = x.shape
    arrangement = m.config.arrangement
    saved = Saved()
    if arrangement in ("channel-spatial", "parallel", "channel"):
        saved.channel = _channel_forward(x, m.channel_gate, for_backward)
    gate_c = saved.channel.gate.to(x.dtype).view(b, c, 1, 1) if saved.channel else None
    if arrangement == "channel-spatial":
        y = x * gate_c
        saved.spatial = _spatial_forward(y, m.spatial_gate, for_backward)
        return y.mul_(saved.spatial.gate.to(x.dtype).view(b, 1, h, w)), saved
    if arrangement == "channel":
        return x * gate_c, saved
    saved.spatial = _spatial_forward(x, m.spatial_gate, for_backward)
    gate_s = saved.spatial.gate.to(x.dtype).view(b, 1, h, w)
    if arrangement == "spatial-channel":
        z = x * gate_s
        saved.channel = _channel_forward(z, m.channel_gate, for_backward)
        return z.mul_(saved.channel.gate.to(x.dtype).view(b, c, 1, 1)), saved
    if arrangement == "spatial":
        return x * gate_s, saved
    return (x * gate_c).mul_(gate_s), saved


def fused_backward(
    x: Tensor, g: Tensor, m: GatedModule, saved: Saved
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
    cs, ss = saved.channel, saved.spatial
    gate_c = cs.gate.to(dt).view(b, c, 1, 1) if cs is not None else None
    gate_s = ss.gate.to(dt).view(b, 1, h, w) if ss is not None else None

    def spatial_grads(d_gate_s: Tensor) -> tuple[Tensor | None, Tensor]:
        return _split_maps(_spatial_backward(d_gate_s, ss, spatial, grads), spatial, dt)

    def channel_grads(d_gate_c: Tensor) -> _PoolGrads:
        d_pooled = _channel_backward(d_gate_c, cs, channel, grads)
        return _PoolGrads.of(d_pooled, cs, channel.pool_types, h * w)

    def sum_c(t: Tensor, weight: Tensor) -> Tensor:
        """sum_c t[b, c, hw] * weight[b, c] as (B, H*W)."""
        return torch.bmm(weight.reshape(b, 1, c).to(dt), flat(t)).view(b, h * w)

    # prod = g * x in a reused buffer; dx is the only fresh full-size tensor of the backward.
    prod = torch.mul(g, x, out=_workspace(x))
    if arrangement == "channel":
        terms = channel_grads(prod.sum((2, 3)))
        return _spread_channel_terms(g * gate_c, x, terms, cs, None), grads
    if arrangement == "spatial":
        d_max, d_lin = spatial_grads(prod.sum(1).reshape(b, h * w))
        dx = g * gate_s
        _spread_spatial_terms(dx, x, d_max, d_lin, spatial, ss, grads)
        return dx, grads

    d_gate_s = sum_c(prod, gate_c)
    if arrangement == "channel-spatial":
        d_max, d_lin = spatial_grads(d_gate_s)
        # Spatial pooling read y = x * A, so dx = A * t + (channel pooling terms) with
        # t = G * S + dy, and A gets sum_hw x * t; t becomes dx in place.
        if spatial.pool_conv is None:
            dx = torch.addcmul(d_lin / c, g, gate_s)
            d_gate_c = torch.mul(x, dx, out=prod).sum((2, 3))
        else:
            pool_w = spatial.pool_conv.weight.view(1, c, 1, 1).to(dt)
            d_gate_c = prod.mul_(gate_s).sum((2, 3))
            q = torch.mul(x, d_lin, out=prod).sum((2, 3))
            d_gate_c = d_gate_c + pool_w.view(1, c) * q
            grads[spatial.pool_conv.weight] = (q * gate_c.view(b, c)).sum(0).view_as(pool_w)
            dx = (g * gate_s).addcmul_(pool_w, d_lin)
        if d_max is not None:
            offsets = _offsets_c(x, ss.c_argmax)
            at_max = d_max.to(dt) * _storage(x).index_select(0, offsets.view(-1)).view_as(offsets)
            c_offsets = ss.c_argmax + _arange(b, c, x.device).view(b, 1)
            d_gate_c.view(-1).index_add_(0, c_offsets.view(-1), at_max.view(-1))
        terms = channel_grads(d_gate_c)
        dx = _spread_channel_terms(dx, x, terms, cs, gate_c)
        if d_max is not None:
            _scatter_add(dx, _offsets_c(dx, ss.c_argmax), d_max * cs.gate.gather(1, ss.c_argmax))
        return dx, grads

    d_gate_c = prod.mul_(gate_s).sum((2, 3))
    if arrangement == "spatial-channel":
        terms = channel_grads(d_gate_c)
        # Channel pooling read z = x * S, so S also gets sum_c x * dz, and
        # dx = S * (G * A + dz) + the spatial pooling's terms.
        dense = terms.dense(x, cs, gate_s)
        if terms.avg is not None:
            d_gate_s = d_gate_s + sum_c(x, terms.avg)
        if terms.max is not None:
            offsets = _offsets_hw(x, cs.hw_argmax)
            at_max = terms.max.to(dt) * _storage(x).index_select(0, offsets.view(-1)).view_as(
                offsets
            )
            hw_offsets = cs.hw_argmax + _arange(b, h * w, x.device).view(b, 1)
            d_gate_s.view(-1).index_add_(0, hw_offsets.view(-1), at_max.view(-1))
        if dense is not None:
            d_gate_s = d_gate_s + torch.mul(dense, x, out=prod).sum(1).view(b, h * w)
        d_max, d_lin = spatial_grads(d_gate_s)
        dx = g * gate_c
        if terms.avg is not None:
            dx.add_(terms.avg.to(dt).view(b, c, 1, 1))
        if dense is not None:
            dx.add_(dense)
        dx.mul_(gate_s)
        if terms.max is not None:
            gate_at = ss.gate.gather(1, cs.hw_argmax)
            _scatter_add(dx, _offsets_hw(dx, cs.hw_argmax), terms.max * gate_at)
        _spread_spatial_terms(dx, x, d_max, d_lin, spatial, ss, grads)
        return dx, grads

    # parallel: both gates read x itself.
    terms = channel_grads(d_gate_c)
    d_max, d_lin = spatial_grads(d_gate_s)
    dx = _spread_channel_terms(g * gate_s, x, terms, cs, gate_c)
    _spread_spatial_terms(dx, x, d_max, d_lin, spatial, ss, grads)
    return dx, grads


def _spread_channel_terms(
    t: Tensor, x: Tensor, terms: _PoolGrads, state: _ChannelState, gate_c: Tensor | None
) -> Tensor:
    """dx = t * A + (gradient of the channel pooling of x itself), written into ``t``."""
    b, c = x.shape[:2]
    avg = terms.avg.to(x.dtype).view(b, c, 1, 1) if terms.avg is not None else None
    if gate_c is not None:
        t.mul_(gate_c)
    if avg is not None:
        t.add_(avg)
    if terms.max is not None:
        _scatter_add(t, _offsets_hw(t, state.hw_argmax), terms.max)
    dense = terms.dense(x, state, None)
    if dense is not None:
        t.add_(dense)
    return t


def _spread_spatial_terms(
    dx: Tensor,
    x: Tensor,
    d_max: Tensor | None,
    d_lin: Tensor,
    spatial: SpatialGate,
    state: _SpatialState,
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
    _scatter_add(dx, _offsets_c(dx, state.c_argmax), d_max)


class FusedGates(torch.autograd.Function):
    """out = x * A * S for every arrangement; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: GatedModule, *params: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out, saved = fused_forward(x, module)
        ctx.module, ctx.saved = module, saved
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx, grads = fused_backward(x, grad_out, ctx.module, ctx.saved)
        return (dx, None, *(grads.get(p) for p in ctx.module.parameters()))
