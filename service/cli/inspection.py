"""``cbam-nas inspect``: an architecture's cost, measured here, against its backbone alone."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from search.errors import InvalidValue
from service.cli.params import bad_parameter
from service.cli.render import overhead_table, slots_table

if TYPE_CHECKING:
    from search.space import Architecture

commands = typer.Typer()


class Preset(str, Enum):
    paper = "paper"
    se = "se"
    none = "none"


# preset -> name in search.space.reference_architectures
_PRESETS = {Preset.paper: "cbam", Preset.se: "se", Preset.none: "none"}


def _load_architecture(
    backbone: str | None, preset: Preset | None, architecture_file: Path | None
) -> Architecture:
    from search.space import Architecture, reference_architectures

    if architecture_file is not None:
        if preset is not None:
            raise typer.BadParameter(
                "give either --preset or --architecture, not both", param_hint="--preset"
            )
        try:
            arch = Architecture.from_json(architecture_file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--architecture") from None
        except InvalidValue as exc:
            raise bad_parameter(exc, "--architecture") from None
        if backbone is not None and backbone != arch.backbone:
            raise typer.BadParameter(
                f"backbone: {backbone!r} differs from the file's {arch.backbone!r}",
                param_hint="--backbone",
            )
        return arch
    if backbone is None:
        raise typer.BadParameter(
            "give --backbone (with --preset) or --architecture FILE.json",
            param_hint="--backbone",
        )
    try:
        return reference_architectures(backbone)[_PRESETS[preset or Preset.paper]]
    except InvalidValue as exc:
        raise bad_parameter(exc, "--backbone") from None


@commands.command("inspect")
def inspect_architecture(
    backbone: str | None = typer.Option(
        None, help="Backbone name, e.g. resnet50, timm:resnet50, torchvision:mobilenet_v2."
    ),
    preset: Preset | None = typer.Option(
        None, case_sensitive=False, help="paper (CBAM in every block), se or none. Default: paper."
    ),
    architecture: Path | None = typer.Option(
        None,
        "--architecture",
        exists=True,
        dir_okay=False,
        readable=True,
        help="An architecture as JSON (Architecture.to_json), instead of --preset.",
    ),
    device: str = typer.Option("cpu", help="Where to time: cpu, cuda, cuda:N."),
    num_classes: int | None = typer.Option(
        None, min=1, help="Classifier outputs. Default: 1000 for ImageNet backbones, else 10."
    ),
    in_channels: int = typer.Option(3, min=1, help="Image channels."),
    input_size: int | None = typer.Option(
        None, min=1, help="Image side. Default: the backbone's design size (32, 224, ...)."
    ),
    batch_size: int = typer.Option(1, min=1, help="Batch size of the latency measurement."),
    train_batch_size: int = typer.Option(32, min=1, help="Batch size of the training step."),
    latency: bool = typer.Option(True, help="Time forward passes."),
    train_step: bool = typer.Option(False, help="Time a training step and its peak memory."),
    repeats: int = typer.Option(15, min=1, help="Timed repeats (median reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, nothing else."),
) -> None:
    """Parameters, MACs, attention work, latency and memory of an architecture.

    Every figure is shown absolute and relative to the same backbone without attention.
    """
    from search.overhead import check_device, measure

    arch = _load_architecture(backbone, preset, architecture)
    try:
        dev = check_device(device)
    except InvalidValue as exc:
        raise bad_parameter(exc, "--device") from None
    if num_classes is None:
        num_classes = 10 if arch.info.input_size == 32 else 1000
    report = measure(
        arch,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        device=dev,
        latency=latency,
        train_step=train_step,
        batch_size=batch_size,
        train_batch_size=train_batch_size,
        repeats=repeats,
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    Console().print(overhead_table(report))


@commands.command("slots")
def slots(
    backbone: str = typer.Option(
        ..., help="Backbone name, e.g. cifar_resnet20, timm:resnet50, torchvision:mobilenet_v2."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, nothing else."),
) -> None:
    """The attention slots of a backbone: its stages, the blocks in each, and the channels the
    attention in each block sees (for a timm or torchvision model, as found in it)."""
    from search.catalogue import backbone_info

    try:
        info = backbone_info(backbone)
    except InvalidValue as exc:
        raise bad_parameter(exc, "--backbone") from None
    if as_json:
        typer.echo(json.dumps(info.to_dict()))
        return
    Console().print(slots_table(info))
