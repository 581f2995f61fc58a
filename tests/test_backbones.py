"""Backbones: exact parameter counts, attention placement, torchvision compatibility, shapes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from search.errors import InvalidValue
from search.nn.backbones import BACKBONES, AttentionFactory, build_backbone, cifar_resnet
from search.nn.cbam import CBAM


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name: str, num_classes: int, attention: AttentionFactory | None = None) -> nn.Module:
    """Build without allocating or initialising real weights: enough for counts and structure."""
    with torch.device("meta"):
        return build_backbone(name, num_classes, attention=attention)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] == "attn" and not isinstance(m, nn.Identity)
    }


class Marker(nn.Module):
    """An attention stand-in that remembers where it was built and what width it saw."""

    def __init__(self, stage: int, block: int, channels: int) -> None:
        super().__init__()
        self.where = (stage, block, channels)
        self.seen: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.shape[1]
        return x


class Recorder:
    """An AttentionFactory that records its calls and places a Marker where ``place`` says."""

    def __init__(self, place: Callable[[int, int], bool] = lambda stage, block: True) -> None:
        self.place = place
        self.calls: list[tuple[int, int, int]] = []
        self.built: list[Marker] = []

    def __call__(self, stage: int, block: int, channels: int) -> nn.Module:
        self.calls.append((stage, block, channels))
        if not self.place(stage, block):
            return nn.Identity()
        marker = Marker(stage, block, channels)
        self.built.append(marker)
        return marker


def expected_calls(name: str) -> list[tuple[int, int, int]]:
    info = BACKBONES[name]
    return [
        (stage, block, info.stage_channels[stage - 1])
        for stage, blocks in zip(info.stages, info.blocks_per_stage, strict=True)
        for block in range(blocks)
    ]


def block_at(model: nn.Module, stage: int, block: int) -> nn.Module:
    return getattr(model, f"layer{stage}")[block]


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("cifar_resnet20", 10, 269_722),
        ("resnet18", 1000, 11_689_512),
        ("resnet34", 1000, 21_797_672),
        ("resnet50", 1000, 25_557_032),
        ("mobilenet_v1", 1000, 4_231_976),
    ],
)
def test_baseline_parameter_counts(name: str, num_classes: int, expected: int) -> None:
    assert n_params(build_meta(name, num_classes)) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 11_779_392), ("resnet34", 21_960_468), ("resnet50", 28_089_624)],
)
def test_cbam_in_every_block_matches_paper_counts(name: str, expected: int) -> None:
    model = build_meta(name, 1000, lambda stage, block, channels: CBAM(channels))
    assert n_params(model) == expected
    assert len(attention_modules(model)) == sum(BACKBONES[name].blocks_per_stage)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_factory_called_once_per_block_with_stage_block_channels(name: str) -> None:
    recorder = Recorder()
    model = build_meta(name, 10, recorder)
    assert recorder.calls == expected_calls(name)
    assert len(attention_modules(model)) == len(recorder.built)
    for marker in recorder.built:
        stage, block, _ = marker.where
        assert block_at(model, stage, block).attn is marker


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet34", "resnet50", "mobilenet_v1"])
@pytest.mark.parametrize(
    "placement",
    ["stage2", "first", "last"],
)
def test_placement_subsets(name: str, placement: str) -> None:
    info = BACKBONES[name]
    last = {
        stage: blocks - 1 for stage, blocks in zip(info.stages, info.blocks_per_stage, strict=True)
    }
    place: Callable[[int, int], bool] = {
        "stage2": lambda stage, block: stage == 2,
        "first": lambda stage, block: block == 0,
        "last": lambda stage, block: block == last[stage],
    }[placement]
    recorder = Recorder(place)
    model = build_meta(name, 10, recorder)

    wanted = {(s, b) for s, b, _ in expected_calls(name) if place(s, b)}
    expected_count = info.blocks_per_stage[1] if placement == "stage2" else len(info.stages)
    assert len(wanted) == expected_count
    assert len(attention_modules(model)) == expected_count
    for stage, block, _ in expected_calls(name):
        attn = block_at(model, stage, block).attn
        assert isinstance(attn, Marker) == ((stage, block) in wanted)


class Zero(nn.Module):
    """Remembers its input and outputs zeros: shows where the slot sits in the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input = x.clone()
        return torch.zeros_like(x)


@pytest.mark.parametrize(
    ("name", "stage", "block"),
    [("cifar_resnet20", 1, 1), ("cifar_resnet20", 2, 0), ("resnet18", 2, 0), ("resnet50", 1, 1)],
)
def test_residual_slot_is_before_the_addition_and_the_final_relu(
    name: str, stage: int, block: int
) -> None:
    model = build_backbone(name, 10, attention=lambda stage, block, channels: Zero()).eval()
    unit = block_at(model, stage, block)
    x = torch.randn(2, unit.conv1.in_channels, 8, 8)
    shortcut = x if unit.downsample is None else unit.downsample(x)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), torch.relu(shortcut))
    assert (unit.attn.input < 0).any()  # after the last BN, not after a ReLU


def test_mobilenet_slot_is_at_the_block_output() -> None:
    model = build_backbone("mobilenet_v1_0.25", 10, attention=lambda s, b, c: Zero()).eval()
    unit = block_at(model, 4, 1)
    with torch.no_grad():
        out = unit(torch.randn(2, unit.conv1.in_channels, 4, 4))
    assert torch.all(out == 0)
    assert (unit.attn.input >= 0).all() and (unit.attn.input > 0).any()  # after BN + ReLU


def test_attention_keeps_its_own_initialisation() -> None:
    """The backbone's init must not overwrite the attention module's (CBAM's BN gamma 0)."""

    def zero_conv(stage: int, block: int, channels: int) -> nn.Module:
        conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(conv.weight)
        return conv

    model = build_backbone("cifar_resnet20", 10, attention=zero_conv)
    assert all(torch.all(m.weight == 0) for m in attention_modules(model).values())


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "resnet50", "mobilenet_v1_0.25"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_shapes_grey_input(name: str, channels_last: bool) -> None:
    recorder = Recorder()
    model = build_backbone(name, 10, in_channels=1, attention=recorder).eval()
    x = torch.randn(2, 1, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert all(m.seen == m.where[2] for m in recorder.built)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_into_backbone(name: str) -> None:
    theirs = getattr(torchvision.models, name)(weights=None)
    ours = build_backbone(name, 1000, attention=lambda stage, block, channels: CBAM(channels))
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(".attn." in key for key in result.missing_keys)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_without_attention_equals_torchvision(name: str) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None)
    for m in theirs.modules():  # non-trivial BN statistics, so that eval mode means something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    ours = build_backbone(name, 1000)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_registry_infos() -> None:
    assert set(BACKBONES) == {
        *(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)),
        *(f"resnet{d}" for d in (18, 34, 50, 101)),
        "mobilenet_v1",
        "mobilenet_v1_0.75",
        "mobilenet_v1_0.5",
        "mobilenet_v1_0.25",
    }
    for name, info in BACKBONES.items():
        assert info.name == name
        assert info.input_size == (32 if info.family == "cifar_resnet" else 224)
        assert info.stages == tuple(range(1, len(info.blocks_per_stage) + 1))
        assert len(info.stage_channels) == len(info.blocks_per_stage)
    assert BACKBONES["cifar_resnet110"].blocks_per_stage == (18, 18, 18)
    assert BACKBONES["resnet50"].stage_channels == (256, 512, 1024, 2048)
    assert BACKBONES["mobilenet_v1_0.25"].stage_channels == (16, 32, 64, 128, 256)
    assert BACKBONES["mobilenet_v1"].blocks_per_stage == (1, 2, 2, 6, 2)


def test_unknown_backbone_names_field_and_choices() -> None:
    with pytest.raises(InvalidValue) as caught:
        build_backbone("resnet19", 10)
    assert caught.value.field == "backbone"
    assert caught.value.value == "resnet19"
    assert all(name in str(caught.value) for name in BACKBONES)


def test_cifar_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(InvalidValue, match="depth"):
        cifar_resnet(21)
