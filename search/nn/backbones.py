"""Backbones with an attention slot in every block: CIFAR ResNets, ResNet-18..101, MobileNet v1.

Every block holds its attention module in ``attn`` (``nn.Identity()`` where there is none). The
modules come from an ``AttentionFactory`` called as ``factory(stage, block, channels)`` once per
block: stages count from 1 (ResNet ``layer1`` is stage 1), blocks from 0 within their stage, and
``channels`` is the block's output width, which is what the attention sees. The factory decides the
placement; the backbone builds exactly the modules it returns.

Where the slot sits:

* ResNets: on the residual branch after the last BN, before the shortcut addition and the final
  ReLU (CBAM paper, Fig. 3).
* MobileNet v1 has no residual, so the slot is at the block's output: after the pointwise conv's
  BN + ReLU, before the next block.

The families:

* ``cifar_resnet{20,32,44,56,110}``: He et al. 2016, section 4.2 (depth 6n+2, three stages of n
  BasicBlocks with 16/32/64 channels, 3x3 stem, no max pool). Shortcuts use option A, as the paper
  does for CIFAR: parameter-free, the input subsampled with stride 2 and zero-padded to the wider
  channel count (so ResNet-20 has 269,722 parameters with 10 classes).
* ``resnet{18,34,50,101}``: structured like ``torchvision.models.resnet`` (same module names,
  Bottleneck stride on the 3x3 conv, i.e. ResNet v1.5), so a torchvision state_dict loads into the
  backbone part; only the ``attn.*`` keys are then missing.
* ``mobilenet_v1`` and ``mobilenet_v1_{0.75,0.5,0.25}``: Howard et al. 2017 with width multiplier
  alpha; the 13 depthwise-separable blocks are grouped into five stages by output width.

Weights start as torchvision does (Kaiming normal, fan_out, for convs; BN weight 1, bias 0; PyTorch
defaults for the classifier). Attention modules keep their own initialisation. ``in_channels`` sets
the stem's input channels (1 for grey-scale data). All models flatten with ``torch.flatten`` after
pooling, so channels_last inputs work throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search.backbones import (
    BACKBONES,
    CIFAR_WIDTHS,
    MOBILENET_STAGES,
    catalogue_info,
    library_of,
)
from search.errors import InvalidValue
from search.nn.library import build_library_backbone

AttentionFactory = Callable[[int, int, int], nn.Module]
NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """He et al.'s option A shortcut: subsample by ``stride`` and zero-pad the channels.

    The padding is split evenly between both sides of the channel axis. No parameters.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_planes - in_planes) // 2
        self.pad_back = out_planes - in_planes - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 convs; attention after ``bn2``, before the addition."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.attn = attn if attn is not None else nn.Identity()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out of place: the attention module may have saved its output for backward.
        out = self.attn(out)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand; attention after
    ``bn3``, before the addition."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn if attn is not None else nn.Identity()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.attn(out)
        out += identity
        return self.relu(out)


ResidualBlock = type[BasicBlock] | type[Bottleneck]
# (in_planes, out_planes, stride) -> the shortcut's module, called only where the shape changes.
ShortcutFactory = Callable[[int, int, int], nn.Module]


def _attention(
    attention: AttentionFactory | None, stage: int, block: int, channels: int
) -> nn.Module:
    return nn.Identity() if attention is None else attention(stage, block, channels)


def _init_weights(model: nn.Module) -> None:
    """torchvision's initialisation, skipping attention modules: they own theirs (CBAM's spatial BN
    starts at gamma 0 so that its gate is 0.5)."""
    for name, m in model.named_modules():
        if "attn" in name.split("."):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class _ResNetBase(nn.Module):
    """Stages and forward pass shared by the ImageNet and CIFAR ResNets.

    Subclasses define ``conv1``, ``bn1``, ``relu``, ``maxpool`` (``nn.Identity`` when absent),
    ``layer1`` .. ``layer{num_stages}``, ``avgpool`` and ``fc``.
    """

    num_stages: int

    def _make_stage(
        self,
        block: ResidualBlock,
        inplanes: int,
        planes: int,
        blocks: int,
        stride: int,
        stage: int,
        attention: AttentionFactory | None,
        norm_layer: NormLayer,
        shortcut: ShortcutFactory,
    ) -> nn.Sequential:
        out_planes = planes * block.expansion
        layers = []
        for index in range(blocks):
            block_stride = stride if index == 0 else 1
            downsample = None
            if block_stride != 1 or inplanes != out_planes:
                downsample = shortcut(inplanes, out_planes, block_stride)
            attn = _attention(attention, stage, index, out_planes)
            layers.append(block(inplanes, planes, block_stride, downsample, norm_layer, attn))
            inplanes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet(_ResNetBase):
    """torchvision's ResNet (7x7 stem, max pool, four stages) with attention slots."""

    num_stages = 4

    def __init__(
        self,
        block: ResidualBlock,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        attention: AttentionFactory | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d

        def shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
            return nn.Sequential(conv1x1(in_planes, out_planes, stride), norm_layer(out_planes))

        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for stage, blocks in enumerate(layers, start=1):
            planes = 64 * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            layer = self._make_stage(
                block, inplanes, planes, blocks, stride, stage, attention, norm_layer, shortcut
            )
            setattr(self, f"layer{stage}", layer)
            inplanes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)


class CifarResNet(_ResNetBase):
    """He et al. 2016, section 4.2: 3x3 stem, three stages of n BasicBlocks (16/32/64 channels),
    option A shortcuts; depth = 6n + 2."""

    num_stages = 3

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        attention: AttentionFactory | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise InvalidValue("depth", depth, "6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...)")
        norm_layer = norm_layer or nn.BatchNorm2d
        blocks = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        inplanes = 16
        for stage, planes in enumerate(CIFAR_WIDTHS, start=1):
            stride = 1 if stage == 1 else 2
            layer = self._make_stage(
                BasicBlock,
                inplanes,
                planes,
                blocks,
                stride,
                stage,
                attention,
                norm_layer,
                ShortcutA,
            )
            setattr(self, f"layer{stage}", layer)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)


class DepthwiseSeparable(nn.Module):
    """MobileNet v1 block: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU, then attention.

    There is no residual to place the attention beside, so it acts on the block's output.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        norm_layer: NormLayer | None = None,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, inplanes, stride, groups=inplanes)
        self.bn1 = norm_layer(inplanes)
        self.conv2 = conv1x1(inplanes, planes)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.attn(x)


class MobileNetV1(nn.Module):
    """Howard et al. 2017: 3x3 stride-2 stem, 13 depthwise-separable blocks in five stages
    (``layer1`` .. ``layer5``), global average pool, classifier. Widths are scaled by
    ``width_mult`` and truncated to int."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        attention: AttentionFactory | None = None,
        width_mult: float = 1.0,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise InvalidValue("width_mult", width_mult, "a positive number")
        norm_layer = norm_layer or nn.BatchNorm2d
        inplanes = int(32 * width_mult)
        self.conv1 = conv3x3(in_channels, inplanes, stride=2)
        self.bn1 = norm_layer(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.num_stages = len(MOBILENET_STAGES)
        for stage, spec in enumerate(MOBILENET_STAGES, start=1):
            blocks = []
            for index, (width, stride) in enumerate(spec):
                planes = int(width * width_mult)
                attn = _attention(attention, stage, index, planes)
                blocks.append(DepthwiseSeparable(inplanes, planes, stride, norm_layer, attn))
                inplanes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# The registry: each public constructor registers the catalogue names it builds (torchvision's
# ``register_model`` does the same for its models).

_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {}
_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])


def register_backbone(name: str, **fixed: Any) -> Callable[[_Builder], _Builder]:
    """Register ``builder(**fixed, num_classes=..., in_channels=..., attention=...)`` as the
    catalogue's backbone ``name``; stack one per name a builder makes."""
    if name not in BACKBONES:
        raise ValueError(f"{name!r} is not in the backbone catalogue (search.backbones)")

    def register(builder: _Builder) -> _Builder:
        if name in _CONSTRUCTORS:
            raise ValueError(f"backbone {name!r} is registered twice")
        _CONSTRUCTORS[name] = partial(builder, **fixed)
        return builder

    return register


def _resnet(
    name: str, block: ResidualBlock, num_classes: int, in_channels: int, attention: Any
) -> ResNet:
    layers = BACKBONES[name].blocks_per_stage
    return ResNet(block, layers, num_classes, in_channels, attention)


@register_backbone("resnet18")
def resnet18(
    num_classes: int = 1000, in_channels: int = 3, attention: AttentionFactory | None = None
) -> ResNet:
    return _resnet("resnet18", BasicBlock, num_classes, in_channels, attention)


@register_backbone("resnet34")
def resnet34(
    num_classes: int = 1000, in_channels: int = 3, attention: AttentionFactory | None = None
) -> ResNet:
    return _resnet("resnet34", BasicBlock, num_classes, in_channels, attention)


@register_backbone("resnet50")
def resnet50(
    num_classes: int = 1000, in_channels: int = 3, attention: AttentionFactory | None = None
) -> ResNet:
    return _resnet("resnet50", Bottleneck, num_classes, in_channels, attention)


@register_backbone("resnet101")
def resnet101(
    num_classes: int = 1000, in_channels: int = 3, attention: AttentionFactory | None = None
) -> ResNet:
    return _resnet("resnet101", Bottleneck, num_classes, in_channels, attention)


@register_backbone("cifar_resnet20", depth=20)
@register_backbone("cifar_resnet32", depth=32)
@register_backbone("cifar_resnet44", depth=44)
@register_backbone("cifar_resnet56", depth=56)
@register_backbone("cifar_resnet110", depth=110)
def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 3,
    attention: AttentionFactory | None = None,
) -> CifarResNet:
    return CifarResNet(depth, num_classes, in_channels, attention)


@register_backbone("mobilenet_v1", width_mult=1.0)
@register_backbone("mobilenet_v1_0.75", width_mult=0.75)
@register_backbone("mobilenet_v1_0.5", width_mult=0.5)
@register_backbone("mobilenet_v1_0.25", width_mult=0.25)
def mobilenet_v1(
    num_classes: int = 1000,
    in_channels: int = 3,
    attention: AttentionFactory | None = None,
    width_mult: float = 1.0,
) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels, attention, width_mult)


if set(_CONSTRUCTORS) != set(BACKBONES):
    raise RuntimeError(f"backbones without a module: {sorted(set(BACKBONES) - set(_CONSTRUCTORS))}")


def build_backbone(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    attention: AttentionFactory | None = None,
) -> nn.Module:
    """Build backbone ``name`` with ``attention(stage, block, channels)`` in each block's slot:
    ours, or a timm or torchvision model (``timm:resnet50``, :mod:`search.nn.library`)."""
    if name not in BACKBONES and library_of(name) is not None:
        return build_library_backbone(name, num_classes, in_channels, attention)
    catalogue_info(name)
    return _CONSTRUCTORS[name](
        num_classes=num_classes, in_channels=in_channels, attention=attention
    )
