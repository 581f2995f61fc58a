"""The commands that run here, on the database: the API server (``serve``), workers
(``worker``), a local search without a server (``run``) and Optuna's storage proxy."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from search.errors import InvalidValue
from service.cli.params import bad_parameter, open_database
from service.cli.render import board_table, stdout_console

if TYPE_CHECKING:
    from search.store.engine import Database

commands = typer.Typer()


def _setup_logging(rich_output: bool) -> None:
    if rich_output:
        from rich.logging import RichHandler

        from workers.console import stderr_console

        handler: logging.Handler = RichHandler(console=stderr_console(), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@commands.command("serve")
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
    from service.server import local_workers, submit_specs, worker_devices

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
            raise bad_parameter(exc, "--device") from None
    devices = [] if workers == 0 else worker_devices(device, workers)
    settings.ensure_dirs()
    db = open_database(settings.database_url, role="api")
    db.migrate()
    try:
        searches = submit_specs(db, settings, submit)
    except InvalidValue as exc:
        raise bad_parameter(exc, "--submit") from None
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

    local = local_workers(db, settings, devices)
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


@commands.command("worker")
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
    threads: int | None = typer.Option(
        None, min=1, help="torch threads (per slot). Default: the cores shared by the slots."
    ),
    slots: int | None = typer.Option(
        None,
        "--slots",
        min=1,
        help="Trials run at once, each slot a worker process of its own. Default: from the "
        "device (CUDA: as many as its free memory holds at 3 GiB each, at most 4; CPU: one per "
        "core, at most 8).",
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar. Default: when on a terminal."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Coordination only: claim, ask and tell each trial with made-up metrics (from a "
        "hash of the architecture) without loading data, measuring or training; no artifacts; "
        "--device is recorded, not used (a stand-in for a worker there). For load tests and "
        "benchmarks/coordination.py: never on a real search.",
    ),
    dry_run_seconds: float = typer.Option(
        0.0,
        "--dry-run-seconds",
        min=0.0,
        help="With --dry-run: seconds each trial holds the worker in place of training (a sleep).",
    ),
) -> None:
    """Pull trials from the database and run them until stopped (SIGTERM/SIGINT: the current
    trial is handed back at the next epoch boundary). With --slots N, N worker processes do so
    side by side on the device (--max-trials counts per slot). With --dry-run the trials are
    recorded with made-up metrics instead of being trained."""
    from service.server import watch_parent
    from workers.options import WorkerOptions
    from workers.slots import default_slots, threads_per_slot
    from workers.worker import Worker, check_search

    watch_parent()
    if not dry_run:  # a dry run stands in for a worker on --device: nothing runs there
        # torch is imported here, not above: a dry-run worker (load tests) never needs it and
        # starts in about 1.5 s instead of 4.
        from search.overhead import check_device

        try:
            check_device(device)
        except InvalidValue as exc:
            raise bad_parameter(exc, "--device") from None
    on_terminal = sys.stderr.isatty() if progress is None else progress
    _setup_logging(on_terminal)
    if slots is None:
        slots = 1 if dry_run else default_slots(device)
    count = slots
    if count > 1:
        forwarded = {
            "database": database,
            "artifacts": artifacts,
            "device": device,
            "search": search,
            "max_trials": max_trials,
            "grace_period": grace_period,
            "heartbeat_interval": heartbeat_interval,
            "poll_interval": poll_interval,
            "latency_batch": latency_batch,
            "latency_repeats": latency_repeats,
            "threads": threads or threads_per_slot(device, count),
            "dry_run_seconds": dry_run_seconds if dry_run else None,
        }
        flags = [
            flag
            for flag, on in (("--exit-when-idle", exit_when_idle), ("--dry-run", dry_run))
            if on
        ]
        if search is not None:  # refused here, once, rather than by every slot
            db = open_database(database, role="worker")
            db.migrate()
            try:
                check_search(db, search)
            except InvalidValue as exc:
                raise bad_parameter(exc, "--search") from None
            finally:
                db.close()
        raise typer.Exit(_run_slots(count, name, forwarded, flags))
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
        dry_run_seconds=dry_run_seconds,
    )
    try:
        status = Worker(options).run()
    except InvalidValue as exc:
        hints = {"search": "--search", "device": "--device", "database_url": "--database"}
        raise bad_parameter(exc, hints.get(exc.field)) from None
    raise typer.Exit(status)


def _worker_command(
    name: str, options: dict[str, Any], flags: Sequence[str] = (), slots: int = 1
) -> list[str]:
    """The command line of one worker process with ``options`` (None: left out) and ``flags``."""
    command = [sys.executable, "-m", "service.cli", "worker", "--name", name, "--no-progress"]
    command += ["--slots", str(slots), *flags]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def _run_slots(count: int, name: str | None, options: dict[str, Any], flags: list[str]) -> int:
    """``count`` worker processes of one slot each, stopped together on SIGTERM or Ctrl-C (each
    hands its trial back); returns when all have exited, with the largest exit status."""
    import socket

    from service.server import ChildWorkers

    base = name or f"{socket.gethostname()}-{os.getpid()}"
    env = dict(os.environ)
    if options.get("threads") is not None:
        env["OMP_NUM_THREADS"] = str(options["threads"])
    commands = [_worker_command(f"{base}-{i}", options, flags) for i in range(count)]
    children = ChildWorkers(commands, env, respawn=False)

    def terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    children.start()
    logging.getLogger("cbam_nas.worker").info(
        "%d slots on %s, %s thread(s) each",
        count,
        options["device"],
        options["threads"] or "torch's",
    )
    try:
        return children.wait()
    except KeyboardInterrupt:
        children.stop()
        return children.wait()


def _wait(db: Database, search_id: str, children: list[subprocess.Popen[bytes]]) -> None:
    """Wait for the workers to exit, with a progress bar of finished trials on a terminal."""
    from rich.progress import Progress
    from sqlalchemy import func, select

    from search.store.models import ResultState, Search, TrialResult

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
    from workers.console import stderr_console

    console = stderr_console()
    with Progress(console=console, disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task("trials", total=budget)
        while any(child.poll() is None for child in children):
            bar.update(task, completed=finished())
            time.sleep(0.5)


@commands.command("run")
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
    from search.results.queries import leaderboard_page
    from search.settings import get_settings
    from search.spec import SearchSpec
    from search.store.models import ResultState, Search, SearchState, TrialResult
    from search.store.searches import create_search

    _setup_logging(sys.stderr.isatty())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = get_settings()
    try:
        spec = SearchSpec.from_yaml(spec_file).validate(
            settings.max_trials_per_search, settings.allowed_data_roots, settings.allow_downloads
        )
    except InvalidValue as exc:
        raise bad_parameter(exc, "SPEC") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="SPEC") from None
    try:
        check_device(device)
    except InvalidValue as exc:
        raise bad_parameter(exc, "--device") from None
    db = open_database(database)
    db.migrate()
    search = create_search(db, spec)
    console = stdout_console()
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
    options["search"] = search.id
    children = [
        subprocess.Popen(_worker_command(f"local-{os.getpid()}-{i}", options), env=env)
        for i in range(workers)
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
    if any(trial_row.state == ResultState.completed for trial_row in rows):
        board = leaderboard_page(db, search.id, overhead=spec.objectives.overheads[0], limit=1000)
        console.print(board_table(board, title=f"search {search.id}"))
    counts: dict[str, int] = {}
    for trial_row in rows:
        counts[trial_row.state.value] = counts.get(trial_row.state.value, 0) + 1
    console.print(", ".join(f"{n} {state_name}" for state_name, n in sorted(counts.items())))
    db.close()
    if state != SearchState.completed:
        console.print(f"[red]search {state.value}[/red]" + (f": {error}" if error else ""))
        raise typer.Exit(1)


@commands.command("storage-proxy")
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
    db = open_database(database)
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
