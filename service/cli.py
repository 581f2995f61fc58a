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
    from search.db import Database, Role
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


# -- the server and its tokens ---------------------------------------------------------------

token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", help="What the token is for, e.g. ci or alice."),
    database: str | None = typer.Option(
        None, "--database", help="SQLAlchemy URL. Default: the settings' (CBAM_NAS_DATABASE_URL)."
    ),
) -> None:
    """Create a token and print it: it is shown this once (only its hash is stored)."""
    from service.auth import create_token

    db = _open_database(database)
    db.migrate()
    try:
        token = create_token(db, name)
    except InvalidValue as exc:
        raise _bad(exc, "--name") from None
    finally:
        db.close()
    typer.echo(token)


@token_app.command("list")
def token_list(
    database: str | None = typer.Option(None, "--database", help="SQLAlchemy URL."),
) -> None:
    """Tokens by name, with when they were created and last used (never the tokens)."""
    from service.auth import list_tokens

    db = _open_database(database)
    db.migrate()
    table = Table("name", "created", "last used", "revoked")
    for row in list_tokens(db):
        last_used = row.last_used_at.isoformat(timespec="seconds") if row.last_used_at else "-"
        created = row.created_at.isoformat(timespec="seconds")
        table.add_row(row.name, created, last_used, "yes" if row.revoked else "")
    db.close()
    Console().print(table)


@token_app.command("revoke")
def token_revoke(
    name: str = typer.Argument(..., help="The token's name."),
    database: str | None = typer.Option(None, "--database", help="SQLAlchemy URL."),
) -> None:
    """Revoke a token: requests with it are refused from now on."""
    from service.auth import revoke_token

    db = _open_database(database)
    db.migrate()
    found = revoke_token(db, name)
    db.close()
    if not found:
        raise typer.BadParameter(f"name: no token is named {name!r}", param_hint="NAME")
    typer.echo(f"revoked {name}")


@app.command("serve")
def serve(
    host: str | None = typer.Option(None, help="Address to listen on. Default: 127.0.0.1."),
    port: int | None = typer.Option(None, min=1, max=65535, help="Port. Default: 8000."),
    database: str | None = typer.Option(
        None, "--database", help="SQLAlchemy URL. Default: SQLite under ./.cbam-nas."
    ),
    artifacts: Path | None = typer.Option(
        None, "--artifacts", help="Artifact directory. Default: ./.cbam-nas/artifacts."
    ),
    workers: int | None = typer.Option(
        None,
        min=0,
        help="Local worker processes (0: API only). Default: one per GPU, else 1.",
    ),
    device: str = typer.Option(
        "auto", help="Workers' device: auto (CUDA GPUs when present), cpu, cuda, cuda:N."
    ),
    read_open: bool | None = typer.Option(
        None, "--read-open/--read-closed", help="Serve GET routes without a token."
    ),
    submit: list[Path] = typer.Option(
        [],
        "--submit",
        exists=True,
        dir_okay=False,
        readable=True,
        help="Submit this search spec (YAML) once; again on a restart resumes it.",
    ),
) -> None:
    """Run the API with local workers; the schema is migrated on start. Ctrl-C stops both
    (running trials are handed back and resume on the next start)."""
    import optuna
    import uvicorn

    from search.overhead import check_device
    from search.settings import get_settings
    from service.app import create_app
    from service.auth import ensure_admin_token
    from service.server import LocalWorkers, submit_specs, worker_devices

    _setup_logging(False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "database_url": database,
        "artifacts_dir": artifacts,
        "read_open": read_open,
    }
    settings = get_settings().model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    if device != "auto":
        try:
            check_device(device)
        except InvalidValue as exc:
            raise _bad(exc, "--device") from None
    devices = [] if workers == 0 else worker_devices(device, workers)
    settings.ensure_dirs()
    db = _open_database(settings.database_url, role="api")
    db.migrate()
    try:
        searches = submit_specs(db, settings, submit)
    except InvalidValue as exc:
        raise _bad(exc, "--submit") from None
    token, created = ensure_admin_token(db, settings.token_file)

    base = f"http://{settings.host}:{settings.port}"
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"[bold]cbam-nas[/bold] on {db!r}, {len(devices)} local worker(s) {devices}")
    console.print(f"  Dashboard: {base}/   (API docs: {base}/docs)")
    console.print(f"  API:       {base}/api/v1")
    console.print(
        f"  Token:     {token}   ({'created' if created else 'kept'} in {settings.token_file};"
        " the CLI reads it from there)"
    )
    for search in searches:
        console.print(f"  Search:    {search.id}  {search.name}  ->  cbam-nas status {search.id}")

    local = LocalWorkers(db, settings, devices)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, db),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
        )
    )
    local.start()
    try:
        server.run()
    finally:
        console.print("stopping local workers (running trials are handed back)...")
        local.stop()
        db.close()
    if not server.started:
        raise typer.Exit(1)


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
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _open_database(url: str | None, role: Role = "tool") -> Database:
    from search.db import open_database

    try:
        return open_database(url, role=role)
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
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Coordination only: claim, ask and tell each trial with made-up metrics (from a "
        "hash of the architecture) without loading data, measuring or training; no artifacts. "
        "For load tests and benchmarks/coordination.py: never on a real search.",
    ),
) -> None:
    """Pull trials from the database and run them until stopped (SIGTERM/SIGINT: the current
    trial is handed back at the next epoch boundary). With --dry-run the trials are recorded
    with made-up metrics instead of being trained."""
    from search.overhead import check_device
    from service.server import watch_parent
    from workers.worker import Worker, WorkerOptions

    watch_parent()
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
        dry_run=dry_run,
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


@app.command("storage-proxy")
def storage_proxy(
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(13000, min=1, max=65535, help="Port."),
    database: str | None = typer.Option(
        None, "--database", help="SQLAlchemy URL. Default: the settings' (CBAM_NAS_DATABASE_URL)."
    ),
) -> None:
    """Run Optuna's gRPC storage proxy in front of the database (schema migrated first).
    Workers started with CBAM_NAS_OPTUNA_STORAGE_URL=grpc://THIS-HOST:PORT send their Optuna
    calls (ask, tell, the samplers' reads) through it; their claims and trial rows still go to
    the database. Needs grpcio and protobuf (the package's `proxy` extra). Ctrl-C stops it."""
    import warnings

    import optuna

    try:
        import grpc  # noqa: F401 (Optuna imports it lazily: fail here, not on the first call)
    except ImportError:
        Console(stderr=True).print(
            "[red]grpcio is not installed:[/red] pip install 'cbam-nas\\[proxy]' (grpcio, protobuf)"
        )
        raise typer.Exit(1) from None
    _setup_logging(False)
    db = _open_database(database)
    db.migrate()
    storage = optuna.storages.get_storage(db.rdb_storage())  # creates Optuna's tables; cached
    Console(stderr=True, soft_wrap=True).print(
        f"Optuna gRPC storage proxy for {db!r} on {host}:{port}; workers: "
        f"CBAM_NAS_OPTUNA_STORAGE_URL=grpc://<this host>:{port}"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        Console(stderr=True).print(f"[red]cannot listen on {host}:{port}:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        db.close()


# -- client commands: talk to a running server -------------------------------------------------

_API_FILES = ("weights.safetensors", "architecture.json", "metrics.json")
_ACTIVE = ("queued", "running")
_TRIAL_STATES = ("completed", "running", "pruned", "failed", "over_budget", "requeued")


def _url_option() -> Any:
    return typer.Option(
        None, "--url", help="The server. Default: the settings' api_url (CBAM_NAS_API_URL)."
    )


def _token_option() -> Any:
    return typer.Option(
        None,
        "--token",
        show_default=False,
        help="API token. Default: CBAM_NAS_TOKEN, else the token file `cbam-nas serve` wrote.",
    )


def _api_client(url: str | None, token: str | None) -> Any:
    from service.client import ApiClient

    try:
        return ApiClient(base_url=url, token=token)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from None


class _ApiErrors:
    """Turn the client's errors into messages on stderr and exit codes: a 4xx answer (the
    request was wrong) exits 2, a 5xx answer or no server at all exits 1."""

    def __enter__(self) -> _ApiErrors:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        from service.client import ApiError, ApiUnreachable

        if isinstance(exc, ApiUnreachable):
            typer.echo(f"Error: {exc.message}", err=True)
            raise typer.Exit(1) from None
        if isinstance(exc, ApiError):
            typer.echo(f"Error ({exc.status}): {exc.message}", err=True)
            raise typer.Exit(2 if 400 <= exc.status < 500 else 1) from None


def _stdout_console() -> Console:
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze tables into 80 columns
        console = Console(width=200)
    return console


def _escape(text: str) -> str:
    """Server text (names, labels, errors) shown literally, not read as rich markup."""
    from rich.markup import escape

    return escape(text)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _when(value: str | None) -> str:
    return "-" if not value else value.replace("T", " ")[:19]


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _best_line(best: dict[str, Any] | None) -> str:
    if not best:
        return "-"
    label = _escape(best["label"])
    line = f"trial {best['number']}: {label}, val acc {_acc(best['val_accuracy'])}%"
    if best.get("params_pct") is not None:
        line += f", params {_pct(best['params_pct'])}"
    return line


def _status_table(search: dict[str, Any]) -> Table:
    progress = search.get("progress") or {}
    spec = search.get("spec") or {}
    state = search["state"]
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(state, "cyan")
    table = Table(title=f"search {search['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("name", _escape(search.get("name") or "-"))
    table.add_row("state", f"[{colour}]{state}[/{colour}]")
    dataset = (spec.get("dataset") or {}).get("name", "-")
    table.add_row("backbone", f"{spec.get('backbone', '-')} on {dataset}")
    budget = progress.get("budget", search.get("budget_trials"))
    table.add_row("trials", f"{progress.get('done', 0)} of {budget} done (budget {budget})")
    table.add_row(
        "by state", ", ".join(f"{progress.get(s, 0)} {s.replace('_', ' ')}" for s in _TRIAL_STATES)
    )
    table.add_row("best so far", _best_line(progress.get("best")))
    table.add_row("ETA", _duration(progress.get("eta_s")))
    table.add_row("created", _when(search.get("created_at")))
    table.add_row("started", _when(search.get("started_at")))
    table.add_row("finished", _when(search.get("finished_at")))
    if search.get("error"):
        table.add_row("error", f"[red]{_escape(search['error'])}[/red]")
    return table


def _absolute(overhead: str, entry: dict[str, Any]) -> str:
    if overhead == "latency":
        value = entry.get("latency_ms")
        return "-" if value is None else _ms(value)
    value = entry.get(overhead)
    return "-" if value is None else _si(value)


def _board_table(board: dict[str, Any], title: str = "") -> Table:
    """The API's leaderboard page as a table: its entries carry rank, pareto and the deltas
    against the references already (computed over the whole search, not just this page)."""
    overhead = board["overhead"]
    entries = board["entries"]
    shown = f"{board['offset'] + 1}-{board['offset'] + len(entries)}" if entries else "none"
    table = Table(
        title=title or None,
        caption=(
            f"{shown} of {board['total']} ranked trials; Δ in accuracy points; "
            f"Pareto: accuracy against {overhead}"
        ),
    )
    columns = ["#", "trial", "architecture", "val acc", "Δ none", "Δ SE", "Δ CBAM", "params"]
    if overhead != "params":
        columns.append(overhead)
    columns += [f"{overhead} %", "epochs", "Pareto"]
    for column in columns:
        table.add_column(column, justify="left" if column == "architecture" else "right")
    for entry in entries:
        label = _escape(entry["label"]) + (
            f" [dim]({entry['reference']})[/dim]" if entry.get("reference") else ""
        )
        cells = [
            str(entry["rank"]),
            str(entry["number"]),
            label,
            _acc(entry["val_accuracy"]),
            _points(entry.get("delta_vs_none")),
            _points(entry.get("delta_vs_se")),
            _points(entry.get("delta_vs_cbam")),
            _absolute("params", entry),
        ]
        if overhead != "params":
            cells.append(_absolute(overhead, entry))
        cells += [
            _pct(entry.get(f"{overhead}_pct")),
            str(entry.get("epochs_run", "-")),
            "*" if entry["pareto"] else "",
        ]
        table.add_row(*cells)
    return table


def _read_spec(spec_file: Path) -> dict[str, Any]:
    """The spec file as a mapping, not validated (the server validates, with its limits);
    an unreadable file or broken YAML is a bad parameter here."""
    import yaml

    from search.spec import _YamlLoader

    try:
        data = yaml.load(spec_file.read_text(), Loader=_YamlLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="SPEC") from None
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"not valid YAML: {exc}", param_hint="SPEC") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise typer.BadParameter(
            f"the file holds a YAML {type(data).__name__}, not a mapping", param_hint="SPEC"
        )
    try:
        json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(f"not expressible as JSON: {exc}", param_hint="SPEC") from None
    return data


def _wait_for(client: Any, search_id: str, interval: float, patience: float = 60.0) -> Any:
    """Poll the search until it leaves queued/running, with a progress bar on a terminal;
    a server that stops answering is retried for ``patience`` seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from service.client import ApiUnreachable

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    silent_since: float | None = None
    with Progress(
        *columns, console=console, disable=not console.is_terminal, transient=True
    ) as bar:
        task = bar.add_task("queued", total=None)
        while True:
            try:
                search = client.search(search_id)
            except ApiUnreachable:
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since > patience:
                    raise
                time.sleep(interval)
                continue
            silent_since = None
            progress = search.get("progress") or {}
            eta = progress.get("eta_s")
            description = search["state"] + (f", ETA {_duration(eta)}" if eta is not None else "")
            bar.update(
                task,
                total=progress.get("budget"),
                completed=progress.get("done", 0),
                description=description,
            )
            if search["state"] not in _ACTIVE:
                return search
            time.sleep(interval)


@app.command("submit")
def submit_search(
    spec_file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, readable=True, help="The search, as YAML."
    ),
    key: str | None = typer.Option(
        None, "--key", help="Idempotency key: submitting again with it returns the same search."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="Follow the search to its end, then print its leaderboard."
    ),
    interval: float = typer.Option(2.0, min=0.05, help="Seconds between polls with --wait."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Submit a search to the server and print its id (the server validates the spec)."""
    spec = _read_spec(spec_file)
    with _ApiErrors(), _api_client(url, token) as client:
        search = client.submit(spec, idempotency_key=key)
        search_id = search["id"]
        again = client.last_status == 200
        typer.echo(
            f"{'existing' if again else 'created'} search {search_id}: {search['name']}, "
            f"{search['budget_trials']} trials",
            err=True,
        )
        typer.echo(search_id)
        if not wait:
            return
        try:
            search = _wait_for(client, search_id, interval)
        except KeyboardInterrupt:
            typer.echo(
                f"stopped waiting; the search goes on: cbam-nas status {search_id}", err=True
            )
            raise typer.Exit(130) from None
        overheads = ((search.get("spec") or {}).get("objectives") or {}).get("overheads")
        board = client.leaderboard(search_id, overhead=(overheads or ["params"])[0])
    console = _stdout_console()
    console.print(_board_table(board, title=f"search {search_id}"))
    progress = search.get("progress") or {}
    console.print(", ".join(f"{progress.get(s, 0)} {s.replace('_', ' ')}" for s in _TRIAL_STATES))
    if search["state"] != "completed":
        error = search.get("error")
        typer.echo(f"search {search['state']}" + (f": {error}" if error else ""), err=True)
        raise typer.Exit(1)


@app.command("status")
def search_status(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    as_json: bool = typer.Option(False, "--json", help="Print the API's JSON, nothing else."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """A search's state and progress: trials done of the budget, by state, best so far, ETA."""
    with _ApiErrors(), _api_client(url, token) as client:
        search = client.search(search_id)
    if as_json:
        typer.echo(json.dumps(search))
        return
    _stdout_console().print(_status_table(search))


@app.command("leaderboard")
def search_leaderboard(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    overhead: str = typer.Option(
        "params", help="Overhead of the Pareto flag and % column: params, macs or latency."
    ),
    limit: int = typer.Option(20, min=1, max=1000, help="Rows to show."),
    offset: int = typer.Option(0, min=0, help="Rows to skip."),
    pareto_only: bool = typer.Option(False, "--pareto-only", help="Only the Pareto front."),
    sort: str | None = typer.Option(
        None, help="Order by: rank (default), number, val_accuracy, params, macs, latency_ms."
    ),
    desc: bool = typer.Option(False, "--desc", help="Descending order of --sort."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Completed trials best first, with deltas to the references and the Pareto flag.

    Deltas are against the no-attention, SE and CBAM references (accuracy points); the
    overhead is over the no-attention model."""
    with _ApiErrors(), _api_client(url, token) as client:
        board = client.leaderboard(
            search_id,
            overhead=overhead,
            limit=limit,
            offset=offset,
            pareto_only=pareto_only,
            sort=sort,
            order="desc" if desc else None,
        )
    _stdout_console().print(_board_table(board, title=f"search {search_id}"))


@app.command("download")
def download_trial(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Directory to write into."),
    trial: int | None = typer.Option(
        None, "--trial", min=0, help="Trial number. Default: the best completed trial."
    ),
    onnx: bool = typer.Option(False, "--onnx", help="Also model.onnx (exported by the server)."),
    overhead: str = typer.Option(
        "params",
        help="Without --trial, with --max-pct: the overhead bounded (params, macs, latency).",
    ),
    max_pct: float | None = typer.Option(
        None, "--max-pct", help="Without --trial: the best within this % overhead."
    ),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Download a trial's weights (safetensors), architecture and metrics, and print the paths."""
    names = [*_API_FILES, *(["model.onnx"] if onnx else [])]
    with _ApiErrors(), _api_client(url, token) as client:
        if trial is None:
            chosen = client.best(search_id, overhead=overhead, max_pct=max_pct)
        else:
            chosen = client.trial(search_id, trial)
        number = chosen["number"]
        typer.echo(
            f"trial {number}: {chosen['label']}, {chosen['state']}, "
            f"val acc {_acc(chosen.get('val_accuracy'))}%",
            err=True,
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(str(exc), param_hint="--out") from None
        for name in names:
            typer.echo(client.download(search_id, number, name, out / name))


@app.command("cancel")
def cancel_search_command(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Cancel a queued or running search; running trials stop at their next epoch."""
    with _ApiErrors(), _api_client(url, token) as client:
        search = client.cancel(search_id)
    typer.echo(f"search {search['id']} {search['state']}")


@app.command("delete")
def delete_search_command(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Delete a finished (or cancelled) search with its trials and stored files."""
    with _ApiErrors(), _api_client(url, token) as client:
        client.delete(search_id)
    typer.echo(f"search {search_id} deleted")


@app.command("searches")
def list_searches_command(
    state: str | None = typer.Option(
        None, help="Only searches in this state: queued, running, completed, cancelled, failed."
    ),
    limit: int = typer.Option(50, min=1, max=500, help="Rows to show."),
    offset: int = typer.Option(0, min=0, help="Rows to skip."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Searches on the server, newest first, with their progress and best accuracy."""
    with _ApiErrors(), _api_client(url, token) as client:
        page = client.searches(state=state, limit=limit, offset=offset)
    items = page["items"]
    shown = f"{offset + 1}-{offset + len(items)}" if items else "none"
    table = Table(caption=f"{shown} of {page['total']} searches")
    for column in ("id", "name", "state", "backbone", "trials", "best val acc", "created"):
        table.add_column(column, justify="right" if column == "trials" else "left")
    for search in items:
        progress = search.get("progress") or {}
        best = progress.get("best") or {}
        table.add_row(
            search["id"],
            _escape(search.get("name") or ""),
            search["state"],
            (search.get("spec") or {}).get("backbone", "-"),
            f"{progress.get('done', 0)}/{search['budget_trials']}",
            _acc(best.get("val_accuracy")),
            _when(search.get("created_at")),
        )
    _stdout_console().print(table)


if __name__ == "__main__":
    app()
