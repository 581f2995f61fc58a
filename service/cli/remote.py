"""The client commands: they talk to a running server through its API (``submit``,
``status``, ``leaderboard``, ``download``, ``cancel``, ``delete``, ``searches``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from service.cli.render import (
    acc,
    board_table,
    duration,
    escape,
    status_table,
    stdout_console,
    trials_by_state,
    when,
)

commands = typer.Typer()


_API_FILES = ("weights.safetensors", "architecture.json", "metrics.json")
_ACTIVE = ("queued", "running")


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
            description = search["state"] + (f", ETA {duration(eta)}" if eta is not None else "")
            bar.update(
                task,
                total=progress.get("budget"),
                completed=progress.get("done", 0),
                description=description,
            )
            if search["state"] not in _ACTIVE:
                return search
            time.sleep(interval)


@commands.command("submit")
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
    console = stdout_console()
    console.print(board_table(board, title=f"search {search_id}"))
    progress = search.get("progress") or {}
    console.print(trials_by_state(progress))
    if search["state"] != "completed":
        error = search.get("error")
        typer.echo(f"search {search['state']}" + (f": {error}" if error else ""), err=True)
        raise typer.Exit(1)


@commands.command("status")
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
    stdout_console().print(status_table(search))


@commands.command("leaderboard")
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
    stdout_console().print(board_table(board, title=f"search {search_id}"))


@commands.command("download")
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
    """Download a trial's model bundle (weights, model.json, README.md, architecture and
    metrics) into --out and print the paths; load it with ``search.load_model(OUT)`` or check
    it with ``cbam-nas predict OUT IMAGE...``."""
    from service.client import ApiError

    with _ApiErrors(), _api_client(url, token) as client:
        if trial is None:
            chosen = client.best(search_id, overhead=overhead, max_pct=max_pct)
        else:
            chosen = client.trial(search_id, trial)
        number = chosen["number"]
        typer.echo(
            f"trial {number}: {chosen['label']}, {chosen['state']}, "
            f"val acc {acc(chosen.get('val_accuracy'))}%",
            err=True,
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(str(exc), param_hint="--out") from None
        try:
            zipped = client.download_bundle(search_id, out / ".bundle.zip", number, onnx=onnx)
        except ApiError as exc:
            if exc.status != 409:
                raise
            # A trial stored before bundles (no record of its normalisation): its files.
            typer.echo(f"no bundle ({exc.message}); downloading its files", err=True)
            for name in [*_API_FILES, *(["model.onnx"] if onnx else [])]:
                typer.echo(client.download(search_id, number, name, out / name))
            return
        for path in _extract(zipped, out):
            typer.echo(path)


def _extract(zipped: Path, out: Path) -> list[Path]:
    """The archive's files written into ``out`` (flat: its folder dropped), the archive
    removed; each file by its base name only, so that no entry writes outside ``out``."""
    import zipfile

    written = []
    try:
        with zipfile.ZipFile(zipped) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                target = out / Path(info.filename).name
                target.write_bytes(archive.read(info))
                written.append(target)
    finally:
        zipped.unlink(missing_ok=True)
    return written


@commands.command("cancel")
def cancel_search_command(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Cancel a queued or running search; running trials stop at their next epoch."""
    with _ApiErrors(), _api_client(url, token) as client:
        search = client.cancel(search_id)
    typer.echo(f"search {search['id']} {search['state']}")


@commands.command("delete")
def delete_search_command(
    search_id: str = typer.Argument(..., metavar="ID", help="The search's id."),
    url: str | None = _url_option(),
    token: str | None = _token_option(),
) -> None:
    """Delete a finished (or cancelled) search with its trials and stored files."""
    with _ApiErrors(), _api_client(url, token) as client:
        client.delete(search_id)
    typer.echo(f"search {search_id} deleted")


@commands.command("searches")
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
            escape(search.get("name") or ""),
            search["state"],
            (search.get("spec") or {}).get("backbone", "-"),
            f"{progress.get('done', 0)}/{search['budget_trials']}",
            acc(best.get("val_accuracy")),
            when(search.get("created_at")),
        )
    stdout_console().print(table)
