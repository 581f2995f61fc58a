"""One CBAM block, ours against timm's CbamModule and the plain reference definition.

Forward and forward+backward at the paper's default setting, at three CIFAR/ImageNet-like
shapes, contiguous and channels_last; all candidates interleaved in one run; medians and the
ratio ours / peer printed. Target: forward+backward <= 0.2x timm's time.

    python -m benchmarks.cbam_block [--rounds 15] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from timm.layers.cbam import CbamModule

from benchmarks._timing import interleaved_medians, machine, parse_args
from search.nn.cbam import CBAM, reference_forward

SHAPES = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8)]


def _candidates(
    shape: tuple[int, ...], layout: torch.memory_format, device: torch.device, backward: bool
) -> dict[str, Callable[[], None]]:
    channels = shape[1]
    ours = CBAM(channels).to(device)
    ref = copy.deepcopy(ours)
    timm = CbamModule(channels).to(device)
    x = torch.randn(shape, device=device).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn_like(x)
    modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ours": ours,
        "timm": timm,
        "ref": lambda t: reference_forward(ref, t),
    }

    def run(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def forward_backward() -> None:
            x.grad = None
            module(x).backward(grad)

        def forward() -> None:
            with torch.no_grad():
                module(x)

        return forward_backward if backward else forward

    return {name: run(m) for name, m in modules.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_args(parser, rounds=15)
    device = args.device
    print(f"CBAM block, fp32, {machine()}; allocator: {args.allocator}")
    print(
        f"{'shape':>18} {'layout':>6} {'pass':>8} {'ours ms':>8} {'timm ms':>8} {'ref ms':>8} "
        f"{'ours/timm':>9} {'ours/ref':>9}"
    )
    worst = 0.0
    for shape in SHAPES:
        for layout in (torch.contiguous_format, torch.channels_last):
            for backward in (False, True):
                t = interleaved_medians(_candidates(shape, layout, device, backward), args.rounds)
                ratio_timm, ratio_ref = t["ours"] / t["timm"], t["ours"] / t["ref"]
                if backward:
                    worst = max(worst, ratio_timm)
                print(
                    f"{shape!s:>18} {'cl' if layout is torch.channels_last else 'nchw':>6} "
                    f"{'fwd+bwd' if backward else 'fwd':>8} {t['ours']:8.2f} {t['timm']:8.2f} "
                    f"{t['ref']:8.2f} {ratio_timm:9.3f} {ratio_ref:9.3f}"
                )
    print(f"worst forward+backward ratio ours / timm = {worst:.3f} (target <= 0.2)")


if __name__ == "__main__":
    main()
