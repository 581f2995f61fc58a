"""A CIFAR ResNet-20 training step (batch 128) with each attention module in every block.

none / SE / timm's CbamModule / the plain reference CBAM / ours; forward, backward and an SGD
step; contiguous and channels_last; interleaved in one run; medians and the ratio to the plain
network printed. Target: ours <= 1.15x plain.

    python -m benchmarks.network_step [--rounds 10] [--batch 128] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers.cbam import CbamModule
from torch import nn

from benchmarks._timing import interleaved_medians, machine, parse_args
from search.nn.backbones import build_backbone
from search.nn.cbam import CBAM, reference_forward
from search.nn.squeeze_excite import SqueezeExcite


class _ReferenceCBAM(CBAM):
    """Our module's parameters computed through the plain definition (autograd does the rest)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_forward(self, x)


ATTENTION: dict[str, Callable[[int], nn.Module] | None] = {
    "none": None,
    "se": SqueezeExcite,
    "timm-cbam": CbamModule,
    "ref-cbam": _ReferenceCBAM,
    "ours-cbam": CBAM,
}


def _step(
    make: Callable[[int], nn.Module] | None,
    layout: torch.memory_format,
    batch: int,
    device: torch.device,
) -> Callable[[], None]:
    factory = None if make is None else (lambda _stage, _block, channels: make(channels))
    torch.manual_seed(0)
    model = build_backbone("cifar_resnet20", 10, attention=factory).to(device)
    model = model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    args = parse_args(parser, rounds=10)
    device = args.device
    print(
        f"CIFAR ResNet-20 training step, batch {args.batch}, fp32, {machine()}; "
        f"allocator: {args.allocator}"
    )
    print(f"{'layout':>6} " + " ".join(f"{name:>10}" for name in ATTENTION) + "   (ms; ratio)")
    for layout in (torch.contiguous_format, torch.channels_last):
        steps = {name: _step(make, layout, args.batch, device) for name, make in ATTENTION.items()}
        t = interleaved_medians(steps, args.rounds)
        name = "cl" if layout is torch.channels_last else "nchw"
        print(f"{name:>6} " + " ".join(f"{t[k]:10.1f}" for k in ATTENTION))
        print(f"{'':>6} " + " ".join(f"{t[k] / t['none']:10.3f}" for k in ATTENTION))
        print(f"{name}: ours-cbam / none = {t['ours-cbam'] / t['none']:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
