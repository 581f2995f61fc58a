"""The ``cbam-nas`` command line: one function per command on one typer app.

Bad input exits with code 2 and a message that names the field and the allowed values.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from search.errors import InvalidValue

if TYPE_CHECKING:
    from search.db import Database
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


# -- workers and local searches -------------------------------------------------------------


def _setup_logging(rich_output: bool) -> None:
    if rich_output:
        from rich.logging import RichHandler

        from workers.worker import stderr_console

        handler: logging.Handler = RichHandler(console=stderr_console(), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _open_database(url: str | None) -> Database:
    from search.db import open_database

    try:
        return open_database(url)
    except InvalidValue as exc:
        raise _bad(exc, "--database") from None


@app.command("worker")
def worker(
    database: str | None = typer.Option(
        None, "--database", help="SQLAlchemy URL. Default: the settings' (CBAM_NAS_DATABASE_URL)."
    ),
    artifacts: Path | None = typer.Option(
        None, "--artifacts", help="Artifact directory. Default: the settings'."
    ),
    device: str = typer.Option("cpu", help="Where to train and time: cpu, cuda, cuda:N."),
    search: str | None = typer.Option(
        None, "--search", help="Work on this search only, and exit when it is finished."
    ),
    max_trials: int | None = typer.Option(None, min=1, help="Exit after this many trials."),
    name: str | None = typer.Option(None, help="Worker name. Default: HOST-PID."),
    grace_period: float = typer.Option(
        60.0, min=0.1, help="Seconds without a heartbeat after which a trial is re-run."
    ),
    heartbeat_interval: float = typer.Option(
        10.0, min=0.05, help="Seconds between heartbeats of a running trial."
    ),
    poll_interval: float = typer.Option(2.0, min=0.05, help="Seconds between looks for work."),
    exit_when_idle: bool = typer.Option(False, help="Exit when no search has work left."),
    latency_batch: int = typer.Option(1, min=1, help="Batch size of the latency measurement."),
    latency_repeats: int = typer.Option(15, min=1, help="Timed forward passes (median)."),
    threads: int | None = typer.Option(None, min=1, help="torch threads. Default: torch's."),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar. Default: when on a terminal."
    ),
) -> None:
    """Pull trials from the database and run them until stopped (SIGTERM/SIGINT: the current
    trial is handed back at the next epoch boundary)."""
    from search.overhead import check_device
    from workers.worker import Worker, WorkerOptions

    on_terminal = sys.stderr.isatty() if progress is None else progress
    _setup_logging(on_terminal)
    try:
        check_device(device)
    except InvalidValue as exc:
        raise _bad(exc, "--device") from None
    options = WorkerOptions(
        database_url=database,
        artifacts_dir=artifacts,
        device=device,
        search_id=search,
        max_trials=max_trials,
        name=name,
        grace_period_s=grace_period,
        heartbeat_interval_s=heartbeat_interval,
        poll_interval_s=poll_interval,
        exit_when_idle=exit_when_idle,
        latency_batch=latency_batch,
        latency_repeats=latency_repeats,
        threads=threads,
        progress=on_terminal,
    )
    try:
        status = Worker(options).run()
    except InvalidValue as exc:
        hints = {"search": "--search", "device": "--device", "database_url": "--database"}
        raise _bad(exc, hints.get(exc.field)) from None
    raise typer.Exit(status)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def leaderboard_table(rows: Sequence[Any], overheads: Sequence[str], title: str = "") -> Table:
    """The leaderboard of a search's rows as a rich table."""
    from search.leaderboard import OVERHEAD_COLUMNS, leaderboard

    table = Table(title=title or None)
    for column in ("#", "architecture", "val acc", "Δ none", "Δ SE", "Δ CBAM", "params"):
        table.add_column(column, justify="left" if column == "architecture" else "right")
    for overhead in overheads:
        table.add_column(f"{overhead} %", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("Pareto", justify="center")
    for entry in leaderboard(rows, overheads):
        label = entry["label"] + (
            f" [dim]({entry['reference']})[/dim]" if entry["reference"] else ""
        )
        table.add_row(
            str(entry["rank"]),
            label,
            f"{100 * entry['val_accuracy']:.2f}",
            _points(entry["delta_vs_none"]),
            _points(entry["delta_vs_se"]),
            _points(entry["delta_vs_cbam"]),
            _si(entry["params"] or 0),
            *(_pct(entry[OVERHEAD_COLUMNS[o][1]]) for o in overheads),
            str(entry["epochs_run"]),
            "*" if entry["pareto"] else "",
        )
    return table


def _worker_command(search_id: str, index: int, options: dict[str, Any]) -> list[str]:
    command = [sys.executable, "-m", "service.cli", "worker", "--search", search_id]
    command += ["--name", f"local-{os.getpid()}-{index}", "--no-progress"]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def _wait(db: Database, search_id: str, children: list[subprocess.Popen[bytes]]) -> None:
    """Wait for the workers to exit, with a progress bar of finished trials on a terminal."""
    from rich.progress import Progress
    from sqlalchemy import func, select

    from search.records import ResultState, Search, TrialResult

    def finished() -> int:
        with db.session() as session:
            return session.scalar(
                select(func.count()).where(
                    TrialResult.search_id == search_id,
                    TrialResult.state.in_(
                        [ResultState.completed, ResultState.pruned, ResultState.over_budget]
                    ),
                )
            )

    with db.session() as session:
        budget = session.get(Search, search_id).budget_trials
    from workers.worker import stderr_console

    console = stderr_console()
    with Progress(console=console, disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task("trials", total=budget)
        while any(child.poll() is None for child in children):
            bar.update(task, completed=finished())
            time.sleep(0.5)


@app.command("run")
def run_search(
    spec_file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, readable=True, help="The search, as YAML."
    ),
    workers: int = typer.Option(1, min=1, help="Worker processes to run."),
    database: str | None = typer.Option(
        None, "--database", help="SQLAlchemy URL. Default: the settings' (CBAM_NAS_DATABASE_URL)."
    ),
    artifacts: Path | None = typer.Option(
        None, "--artifacts", help="Artifact directory. Default: the settings'."
    ),
    device: str = typer.Option("cpu", help="Where the workers train: cpu, cuda, cuda:N."),
    grace_period: float = typer.Option(60.0, min=0.1, help="As for `cbam-nas worker`."),
    heartbeat_interval: float = typer.Option(10.0, min=0.05, help="As for `cbam-nas worker`."),
    latency_repeats: int = typer.Option(15, min=1, help="As for `cbam-nas worker`."),
) -> None:
    """Run a search locally, without a server: create it, run worker processes to completion
    and print the leaderboard."""
    import optuna
    from sqlalchemy import select

    from search.overhead import check_device
    from search.records import Search, SearchState, TrialResult
    from search.searches import create_search
    from search.settings import get_settings
    from search.spec import SearchSpec

    _setup_logging(sys.stderr.isatty())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = get_settings()
    try:
        spec = SearchSpec.from_yaml(spec_file).validate(settings.max_trials_per_search)
    except InvalidValue as exc:
        raise _bad(exc, "SPEC") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="SPEC") from None
    try:
        check_device(device)
    except InvalidValue as exc:
        raise _bad(exc, "--device") from None
    db = _open_database(database)
    db.migrate()
    search = create_search(db, spec)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(f"search {search.id}: {spec.budget.trials} trials on {spec.backbone}")

    env = {**os.environ, "CBAM_NAS_DATABASE_URL": db.url}
    if artifacts is not None:
        env["CBAM_NAS_ARTIFACTS_DIR"] = str(artifacts.absolute())
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    options = {
        "device": device,
        "grace_period": grace_period,
        "heartbeat_interval": heartbeat_interval,
        "latency_repeats": latency_repeats,
    }
    children = [
        subprocess.Popen(_worker_command(search.id, i, options), env=env) for i in range(workers)
    ]
    try:
        _wait(db, search.id, children)
    except KeyboardInterrupt:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()
        raise typer.Exit(130) from None

    with db.session() as session:
        row = session.get(Search, search.id)
        rows = session.scalars(select(TrialResult).where(TrialResult.search_id == search.id)).all()
        state, error = row.state, row.error
    console.print(leaderboard_table(rows, spec.objectives.overheads, title=f"search {search.id}"))
    counts: dict[str, int] = {}
    for trial_row in rows:
        counts[trial_row.state.value] = counts.get(trial_row.state.value, 0) + 1
    console.print(", ".join(f"{n} {state_name}" for state_name, n in sorted(counts.items())))
    db.close()
    if state != SearchState.completed:
        console.print(f"[red]search {state.value}[/red]" + (f": {error}" if error else ""))
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
