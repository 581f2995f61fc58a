"""CBAM (Woo et al., ECCV 2018): the module, and its plain definition.

``CBAM`` computes ``out = x * A[b, c] * S[b, h, w]``: a channel gate ``A`` (the "what") and a
spatial gate ``S`` (the "where"), each a module of :mod:`search.nn.gates`; its knobs are a
:class:`~search.knobs.CBAMConfig`. Arrangements (``CBAMConfig.arrangement``):

- ``channel-spatial`` (the paper): ``F' = Mc(F) * F``, ``F'' = Ms(F') * F'``.
- ``spatial-channel``: ``F' = Ms(F) * F``, ``F'' = Mc(F') * F'``.
- ``parallel`` (not defined by the paper; our definition): both gates from the same input,
  ``F'' = F * Mc(F) * Ms(F)``.
- ``channel`` (channel gate only; with average pooling alone this is squeeze-and-excitation) and
  ``spatial`` (spatial gate only).

:func:`reference_forward` is the plain, line-by-line definition with ordinary autograd ops. CBAM's
cost is memory traffic, not arithmetic, so on the CPU the module runs faster paths that compute
the same function with fewer passes over the feature map: the compiled kernels
(:mod:`search.nn.cbam_kernels`) where they cover the knobs and dtype, else one torch-op autograd
function (:mod:`search.nn.cbam_fused`). Tests hold both to the plain definition in float64,
forward and gradients.

Under ``torch.compile`` (and ``torch.export``) the module runs the plain definition, which
Inductor fuses itself. On CUDA (and any device but the CPU) it runs the plain definition too:
there the cost at the sizes CNNs use is the number of kernel launches, not the bytes, and the
fused path's hand-written backward launches more kernels than autograd does over the plain ops
(measured on an H200, every block shape and precision of ``benchmarks/gpu.py``: ~4.0 ms against
~2.9 ms per forward+backward, and whole trials 28% faster with the plain definition).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from search.knobs import CBAMConfig, has_channel_gate, has_spatial_gate
from search.nn.cbam_fused import FusedGates, fused_forward
from search.nn.cbam_kernels import forget_kernel_plan, kernel_forward, kernel_route
from search.nn.gates import ChannelGate, SpatialGate


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
