"""The backbone catalogue: our backbones, and what the search needs to know of a backbone
without building it (stages, blocks per stage, the channels attention sees, the input size it is
designed for, where its stem and classifier weights are).

Pure data, no torch: the spec and the search space validate against it, the API lists it, and
dry-run workers and the CLI never load torch for it. The modules are :mod:`search.nn.backbones`,
registered for these names only (as the datasets' loaders are for :mod:`search.datasets`).

A search may also name a timm or torchvision model (``timm:resnet50``,
``torchvision:mobilenet_v2``): :mod:`search.nn.library` finds its attention slots by building
it, and :func:`search.catalogue.backbone_info` answers for both kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from search.errors import InvalidValue


@dataclass(frozen=True)
class BackboneInfo:
    """What the search needs to know about a backbone without building it."""

    name: str
    family: str  # ours: "cifar_resnet" | "resnet" | "mobilenet_v1"; a library's: "timm:ResNet"
    blocks_per_stage: tuple[int, ...]
    stage_channels: tuple[int, ...]  # the channels the attention sees in each stage's first block
    input_size: int  # the image side the backbone is designed for: 32, 224, or the library's
    # The channels the attention sees in each block, per stage (a library model's blocks may
    # widen within a stage); empty: every block of a stage has its stage's channels.
    block_channels: tuple[tuple[int, ...], ...] = ()
    # The state-dict keys of the first convolution (its axis 1 is in_channels) and of the
    # classifier (its axis 0 is num_classes).
    stem_weight: str = "conv1.weight"
    classifier_weight: str = "fc.weight"

    def __post_init__(self) -> None:
        if not self.block_channels:  # ours: every block of a stage sees its stage's channels
            per_stage = tuple(
                (channels,) * blocks
                for channels, blocks in zip(self.stage_channels, self.blocks_per_stage, strict=True)
            )
            object.__setattr__(self, "block_channels", per_stage)

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.blocks_per_stage) + 1))

    @property
    def library(self) -> str | None:
        """``timm`` or ``torchvision`` for a library model; None for ours."""
        return library_of(self.name)

    def to_dict(self) -> dict[str, Any]:
        """As ``cbam-nas slots --json`` and ``GET /api/v1/backbones/{name}`` give it."""
        return {
            "name": self.name,
            "family": self.family,
            "stages": list(self.stages),
            "blocks_per_stage": list(self.blocks_per_stage),
            "stage_channels": list(self.stage_channels),
            "block_channels": [list(channels) for channels in self.block_channels],
            "slots": sum(self.blocks_per_stage),
            "input_size": self.input_size,
        }

    def channels(self, stage: int, block: int) -> int:
        """The channels the attention of block ``block`` (from 0) of ``stage`` (from 1) sees."""
        return self.block_channels[stage - 1][block]


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

# A library model: "timm:<name of timm.list_models()>" or "torchvision:<name of
# torchvision.models.list_models()>".
LIBRARIES = ("timm", "torchvision")
LIBRARY_PATTERN = r"^(timm|torchvision):[A-Za-z0-9_.\-]{1,200}$"
_LIBRARY_NAME = re.compile(LIBRARY_PATTERN)
# The block families whose attention slot search.nn.library knows, as its refusals name them.
SUPPORTED_FAMILIES = (
    "torchvision ResNet/ResNeXt/Wide-ResNet (BasicBlock, Bottleneck)",
    "torchvision MobileNetV2/V3 and EfficientNet/EfficientNetV2 (inverted residuals)",
    "timm's ResNet family (resnet*, resnext*, wide_resnet*, seresnet*, ...)",
    "timm's MobileNetV2/V3, EfficientNet, MixNet, MnasNet families (inverted residuals)",
)


def library_of(name: str) -> str | None:
    """``timm`` or ``torchvision`` when ``name`` names a library model; None otherwise."""
    return name.split(":", 1)[0] if _LIBRARY_NAME.match(name) else None


def allowed_backbones() -> str:
    """What a backbone field accepts, for error messages."""
    return (
        f"{', '.join(repr(name) for name in sorted(BACKBONES))}, or a library model as "
        "'timm:<name>' or 'torchvision:<name>' (e.g. 'timm:resnet50', 'torchvision:mobilenet_v2')"
    )


def catalogue_info(value: Any, field: str = "backbone") -> BackboneInfo:
    """Our catalogue's entry for ``value``; InvalidValue at ``field`` listing the backbones."""
    if not isinstance(value, str) or value not in BACKBONES:
        raise InvalidValue(field, value, allowed_backbones())
    return BACKBONES[value]
