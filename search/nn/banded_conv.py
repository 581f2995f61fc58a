"""The spatial gate's k x k convolution on the CPU paths, as a banded matrix product.

The convolution maps the 1-2 pooled maps to one output channel, which is exactly where oneDNN's
convolution is slowest (one output channel, and its backward). Folding the width direction into
a banded (W x W) matrix per map and row offset makes it (B*H, M*k*W) @ (M*k*W, W): dense BLAS
work in both directions. :func:`spatial_conv` and :func:`spatial_conv_backward` take the banded
product where it pays (CPU, maps up to :data:`BANDED_CONV_MAX_WIDTH` wide, k > 1) and the
ordinary convolution elsewhere; the plain definition of the gate (:mod:`search.nn.gates`) always
uses the ordinary convolution.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# Widths up to this use the banded-matrix convolution; wider maps use oneDNN's.
BANDED_CONV_MAX_WIDTH = 64


@lru_cache(maxsize=128)
def _band_selector(width: int, kernel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """E[(w_in, w_out), j] = 1 where tap j of a row filter links w_in to w_out (zero padding)."""
    pos = torch.arange(width, device=device)
    tap = pos.view(width, 1) - pos.view(1, width) + kernel // 2
    return (
        F.one_hot(tap.clamp(0, kernel - 1), kernel)
        .to(dtype)
        .mul_(((tap >= 0) & (tap < kernel)).unsqueeze(-1))
        .view(width * width, kernel)
    )


def _windows(maps: Tensor, kernel: int) -> Tensor:
    """(B*H, M*k*W): for each output row, the k input rows it reads, per map (zero-padded)."""
    b, m, h, w = maps.shape
    pad = kernel // 2
    rows = F.pad(maps, (0, 0, pad, pad)).unfold(2, kernel, 1)  # (b, m, h, w, k)
    return rows.permute(0, 2, 1, 4, 3).reshape(b * h, m * kernel * w)


def banded_conv(maps: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(maps, weight, padding=k // 2)`` for one output channel, as a matrix product."""
    b, m, h, w = maps.shape
    k = weight.shape[-1]
    band = weight.reshape(m * k, k) @ _band_selector(w, k, maps.device, maps.dtype).t()
    out = _windows(maps, k) @ band.view(m * k * w, w)
    return out.view(b, 1, h, w)


def banded_conv_backward(d_out: Tensor, maps: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`banded_conv` for ``maps`` and ``weight``."""
    b, m, h, w = maps.shape
    k = weight.shape[-1]
    pad = k // 2
    selector = _band_selector(w, k, maps.device, maps.dtype)
    band = weight.reshape(m * k, k) @ selector.t()
    d_rows = d_out.reshape(b * h, w)
    d_band = _windows(maps, k).t() @ d_rows
    d_weight = (d_band.view(m * k, w * w) @ selector).view_as(weight)
    d_windows = (d_rows @ band.view(m * k * w, w).t()).view(b, h, m, k, w)
    # Fold the k row windows back: k strided adds beat aten's generic unfold_backward ~5x here.
    d_padded = maps.new_zeros(b, h + 2 * pad, m, w)
    for i in range(k):
        d_padded[:, i : i + h].add_(d_windows[:, :, :, i])
    return d_padded[:, pad : pad + h].permute(0, 2, 1, 3), d_weight


def _banded(maps: Tensor, weight: Tensor) -> bool:
    return (
        maps.device.type == "cpu"
        and maps.shape[-1] <= BANDED_CONV_MAX_WIDTH
        and weight.shape[-1] > 1
    )


def spatial_conv(maps: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(maps, weight, padding=k // 2)``: banded where that pays (differentiable)."""
    if _banded(maps, weight):
        return banded_conv(maps, weight)
    return F.conv2d(maps, weight, padding=weight.shape[-1] // 2)


def spatial_conv_backward(d_out: Tensor, maps: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`spatial_conv` for ``maps`` and ``weight`` given ``d_out``."""
    if _banded(maps, weight):
        return banded_conv_backward(d_out, maps, weight)
    pad = weight.shape[-1] // 2
    d_maps, d_weight, _ = torch.ops.aten.convolution_backward(
        d_out, maps, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    return d_maps, d_weight
