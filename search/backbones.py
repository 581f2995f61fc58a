"""The backbone catalogue: every backbone a search may name, and what the search needs to know
of it without building it (stages, blocks per stage, the channels attention sees in each stage,
the input size it is designed for).

Pure data, no torch: the spec and the search space validate against it, the API lists it, and
dry-run workers and the CLI never load torch for it. The modules are :mod:`search.nn.backbones`,
registered for these names only (as the datasets' loaders are for :mod:`search.datasets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from search.errors import InvalidValue


@dataclass(frozen=True)
class BackboneInfo:
    """What the search needs to know about a backbone without building it."""

    name: str
    family: str  # "cifar_resnet" | "resnet" | "mobilenet_v1"
    blocks_per_stage: tuple[int, ...]
    stage_channels: tuple[int, ...]  # the channels the attention sees in each stage
    input_size: int  # the image side the backbone is designed for: 32 or 224

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.blocks_per_stage) + 1))


# He et al. 2016, section 4.2: depth 6n+2, three stages of n blocks with 16/32/64 channels.
CIFAR_WIDTHS = (16, 32, 64)
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
# torchvision's ResNets: blocks per stage and the block's expansion (4 for Bottleneck).
RESNETS: dict[str, tuple[tuple[int, ...], int]] = {
    "resnet18": ((2, 2, 2, 2), 1),
    "resnet34": ((3, 4, 6, 3), 1),
    "resnet50": ((3, 4, 6, 3), 4),
    "resnet101": ((3, 4, 23, 3), 4),
}
# MobileNet v1 at alpha = 1: the 13 blocks as (output channels, stride), grouped by width.
MOBILENET_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)
MOBILENET_WIDTHS = {
    "mobilenet_v1": 1.0,
    "mobilenet_v1_0.75": 0.75,
    "mobilenet_v1_0.5": 0.5,
    "mobilenet_v1_0.25": 0.25,
}


def _catalogue() -> dict[str, BackboneInfo]:
    infos = []
    for depth in CIFAR_DEPTHS:
        n = (depth - 2) // 6
        infos.append(
            BackboneInfo(f"cifar_resnet{depth}", "cifar_resnet", (n, n, n), CIFAR_WIDTHS, 32)
        )
    for name, (layers, expansion) in RESNETS.items():
        channels = tuple(64 * 2**i * expansion for i in range(len(layers)))
        infos.append(BackboneInfo(name, "resnet", layers, channels, 224))
    for name, alpha in MOBILENET_WIDTHS.items():
        blocks = tuple(len(stage) for stage in MOBILENET_STAGES)
        channels = tuple(int(stage[0][0] * alpha) for stage in MOBILENET_STAGES)
        infos.append(BackboneInfo(name, "mobilenet_v1", blocks, channels, 224))
    return {info.name: info for info in infos}


BACKBONES: dict[str, BackboneInfo] = _catalogue()


def backbone_info(value: Any, field: str = "backbone") -> BackboneInfo:
    """The catalogue's entry for ``value``; InvalidValue at ``field`` listing the backbones."""
    if not isinstance(value, str) or value not in BACKBONES:
        raise InvalidValue(field, value, sorted(BACKBONES))
    return BACKBONES[value]
