"""The ``cbam-nas`` command line: one function per command on one typer app.

Bad input exits with code 2 and a message that names the field and the allowed values.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from search.errors import InvalidValue

if TYPE_CHECKING:
    from search.overhead import OverheadReport
    from search.space import Architecture

# Commands import torch-heavy modules when they run, so that --help stays instant.

app = typer.Typer(
    name="cbam-nas",
    help="Search where and how to put CBAM attention into a CNN.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Search where and how to put CBAM attention into a CNN."""


class Preset(str, Enum):
    paper = "paper"
    se = "se"
    none = "none"


# preset -> name in search.space.reference_architectures
_PRESETS = {Preset.paper: "cbam", Preset.se: "se", Preset.none: "none"}


def _bad(exc: InvalidValue, option: str | None = None) -> typer.BadParameter:
    return typer.BadParameter(str(exc), param_hint=option)


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
            raise _bad(exc, "--architecture") from None
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
        raise _bad(exc, "--backbone") from None


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3f} {prefix}{unit}".rstrip()
    return f"{value:g} {unit}".rstrip()


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _overhead_table(report: OverheadReport) -> Table:
    rows = (
        ("Parameters", "params", _si, "params_pct"),
        ("MACs (conv + matmul)", "macs", _si, "macs_pct"),
        ("Attention elementwise ops", "attention_ops", _si, None),
        (f"Latency (batch {report.batch_size})", "latency_ms", _ms, "latency_pct"),
        (f"Train step (batch {report.train_batch_size})", "train_step_ms", _ms, "train_step_pct"),
        (
            "Peak train memory" + (" (estimate)" if report.peak_memory_estimated else ""),
            "peak_memory_bytes",
            _mib,
            "peak_memory_pct",
        ),
    )
    table = Table(
        title=f"{report.label}  [dim]({report.architecture_id})[/dim]",
        caption=(
            f"{report.backbone}, input {'x'.join(map(str, report.input_shape))}, "
            f"{report.num_classes} classes, device {report.device}"
        ),
    )
    table.add_column("figure")
    table.add_column("with attention", justify="right")
    table.add_column("without", justify="right")
    table.add_column("overhead", justify="right")
    for title, key, fmt, pct_key in rows:
        value, baseline = getattr(report, key), getattr(report, f"baseline_{key}")
        if value is None:
            continue
        pct = getattr(report, pct_key) if pct_key else None
        table.add_row(
            title,
            fmt(value),
            fmt(baseline),
            "-" if pct is None else f"{pct:+.2f}%",
        )
    return table


@app.command("inspect")
def inspect_architecture(
    backbone: str | None = typer.Option(None, help="Backbone name, e.g. resnet50."),
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
        None, min=1, help="Image side. Default: the backbone's (32 or 224)."
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
        raise _bad(exc, "--device") from None
    if num_classes is None:
        num_classes = 1000 if arch.info.input_size == 224 else 10
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
    Console().print(_overhead_table(report))


if __name__ == "__main__":
    app()
