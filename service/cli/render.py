"""What the commands print: number and text formatting, and the rich tables built with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from search.backbones import BackboneInfo
    from search.overhead import OverheadReport

# Trial states in the order progress lines list them.
TRIAL_STATES = ("completed", "running", "pruned", "failed", "over_budget", "requeued")


def si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3f} {prefix}{unit}".rstrip()
    return f"{value:g} {unit}".rstrip()


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def ms(value: float) -> str:
    return f"{value:.2f} ms"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def escape(text: str) -> str:
    """Server text (names, labels, errors) shown literally, not read as rich markup."""
    from rich.markup import escape as escape_markup

    return escape_markup(text)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def when(value: str | None) -> str:
    return "-" if not value else value.replace("T", " ")[:19]


def trials_by_state(progress: dict[str, Any]) -> str:
    """A search's progress as trial counts by state, e.g. ``3 completed, 1 running, ...``."""
    return ", ".join(f"{progress.get(s, 0)} {s.replace('_', ' ')}" for s in TRIAL_STATES)


def stdout_console() -> Console:
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze tables into 80 columns
        console = Console(width=200)
    return console


def overhead_table(report: OverheadReport) -> Table:
    """An architecture's figures against the same backbone without attention."""
    rows = (
        ("Parameters", "params", si, "params_pct"),
        ("MACs (conv + matmul)", "macs", si, "macs_pct"),
        ("Attention elementwise ops", "attention_ops", si, None),
        (f"Latency (batch {report.batch_size})", "latency_ms", ms, "latency_pct"),
        (f"Train step (batch {report.train_batch_size})", "train_step_ms", ms, "train_step_pct"),
        (
            "Peak train memory" + (" (estimate)" if report.peak_memory_estimated else ""),
            "peak_memory_bytes",
            mib,
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
        percent = getattr(report, pct_key) if pct_key else None
        table.add_row(
            title,
            fmt(value),
            fmt(baseline),
            "-" if percent is None else f"{percent:+.2f}%",
        )
    return table


def _best_line(best: dict[str, Any] | None) -> str:
    if not best:
        return "-"
    label = escape(best["label"])
    line = f"trial {best['number']}: {label}, val acc {acc(best['val_accuracy'])}%"
    if best.get("params_pct") is not None:
        line += f", params {pct(best['params_pct'])}"
    return line


def status_table(search: dict[str, Any]) -> Table:
    """The API's search as a table of its state and progress."""
    progress = search.get("progress") or {}
    spec = search.get("spec") or {}
    state = search["state"]
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(state, "cyan")
    table = Table(title=f"search {search['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("name", escape(search.get("name") or "-"))
    table.add_row("state", f"[{colour}]{state}[/{colour}]")
    dataset = (spec.get("dataset") or {}).get("name", "-")
    table.add_row("backbone", f"{spec.get('backbone', '-')} on {dataset}")
    budget = progress.get("budget", search.get("budget_trials"))
    table.add_row("trials", f"{progress.get('done', 0)} of {budget} done (budget {budget})")
    table.add_row("by state", trials_by_state(progress))
    confirmation = progress.get("confirmation") or {}
    if (spec.get("confirm") or {}).get("enabled", True):
        runs = ", ".join(f"{n} {state}" for state, n in confirmation.items() if n) or "none yet"
        table.add_row("confirmation", f"runs: {runs}")
    table.add_row("best so far", _best_line(progress.get("best")))
    if progress.get("val_images"):
        floor = progress.get("noise_floor_pp")
        noise = "" if floor is None else f"; one run's noise floor ±{floor:.2f} points"
        table.add_row("validation", f"{progress['val_images']} images{noise}")
    unfinished = [
        f"{name} (+{check['last_gain_pp']:.2f} points over its last {check['window']} epochs"
        + (f"; by about epoch {check['by_epoch']}" if check.get("by_epoch") else "")
        + ")"
        for name, check in (search.get("references_convergence") or {}).items()
        if check.get("converged") is False
    ]
    if unfinished:
        table.add_row(
            "convergence",
            "[yellow]the references had not finished learning: "
            + escape(", ".join(unfinished))
            + "; a longer schedule may change the comparison[/yellow]",
        )
    agreement = search.get("rank_agreement")
    if agreement and agreement.get("rho") is not None:
        table.add_row(
            "rank agreement",
            f"Spearman {agreement['rho']:+.2f}{_ci(agreement.get('ci95'))} over "
            f"{agreement['n']} architectures: "
            "exploration against confirmation",
        )
    rungs = [r for r in search.get("rung_agreement") or [] if r.get("rho") is not None]
    if rungs:
        table.add_row(
            "rungs",
            "; ".join(
                f"epoch {r['epoch']}: Spearman {r['rho']:+.2f}{_ci(r.get('ci95'))} over {r['n']}"
                for r in rungs
            )
            + " (each rung's accuracies against the final ones of the trials that ran on)",
        )
    table.add_row("ETA", duration(progress.get("eta_s")))
    table.add_row("created", when(search.get("created_at")))
    table.add_row("started", when(search.get("started_at")))
    table.add_row("finished", when(search.get("finished_at")))
    if search.get("error"):
        table.add_row("error", f"[red]{escape(search['error'])}[/red]")
    return table


def _ci(bounds: list[float] | None) -> str:
    return "" if not bounds else f" (95% CI {bounds[0]:+.2f} to {bounds[1]:+.2f})"


def _absolute(overhead: str, entry: dict[str, Any]) -> str:
    if overhead == "latency":
        value = entry.get("latency_ms")
        return "-" if value is None else ms(value)
    value = entry.get(overhead)
    return "-" if value is None else si(value)


_VERDICT_MARKS = {"better": "↑", "worse": "↓", "tied": "≈"}


def _interval(bounds: list[float] | None) -> str:
    return "-" if not bounds else f"{acc(bounds[0])}-{acc(bounds[1])}"


def _delta(entry: dict[str, Any], reference: str) -> str:
    mark = _VERDICT_MARKS.get(entry.get(f"verdict_vs_{reference}") or "", "")
    return points(entry.get(f"delta_vs_{reference}")) + mark


def epochs_cell(entry: dict[str, Any]) -> str:
    """The schedule the entry's figures come from, marked where its run was still learning
    (``converged`` false: it rose beyond noise over its last epochs)."""
    epochs = entry.get("fidelity_epochs") or entry.get("epochs_run")
    text = "-" if epochs is None else str(epochs)
    check = entry.get("convergence") or {}
    if entry.get("converged") is False and check.get("last_gain_pp") is not None:
        text += f" rising +{check['last_gain_pp']:.1f}"
    return text


def noise_warning(board: dict[str, Any]) -> str:
    """A sentence when the differences on the page are within one run's noise floor."""
    if not board.get("within_noise"):
        return ""
    return (
        f". WARNING: the accuracies on this page span {board['spread_pp']:.2f} points, less "
        f"than one run's noise floor (±{board['noise_floor_pp']:.2f}): their order is noise"
    )


def board_table(board: dict[str, Any], title: str = "") -> Table:
    """The API's leaderboard page as a table: its entries carry rank, pareto, their statistics
    and the deltas and verdicts against the references already (computed over the whole
    search, not just this page)."""
    overhead = board["overhead"]
    entries = board["entries"]
    confirmed = board.get("confirmed", False)
    shown = f"{board['offset'] + 1}-{board['offset'] + len(entries)}" if entries else "none"
    what = "confirmed architectures (over their seeds)" if confirmed else "ranked trials"
    verdicts = (
        "; ↑ better, ↓ worse, ≈ tied (paired t on shared seeds, Holm-corrected)"
        if confirmed
        else "; one seed each: the 95% CI is one run's noise floor, nothing is tested"
    )
    table = Table(
        title=title or None,
        caption=(
            f"{shown} of {board['total']} {what}; Δ in accuracy points{verdicts}; "
            f"Pareto: accuracy against {overhead}; answer: the recommended architecture "
            f"(the cheapest of the top group, those not significantly worse than another); "
            "epochs: the schedule, 'rising +x' where the run still gained x points beyond noise "
            f"over its last epochs{noise_warning(board)}"
        ),
    )
    columns = ["#", "trial", "architecture", "val acc", "95% CI", "seeds", "test acc"]
    columns += ["Δ none", "Δ SE", "Δ CBAM", "params"]
    if overhead != "params":
        columns.append(overhead)
    columns += [f"{overhead} %", "epochs", "Pareto", "answer"]
    for column in columns:
        table.add_column(column, justify="left" if column == "architecture" else "right")
    top = set(board.get("top_group") or [])
    for entry in entries:
        label = escape(entry["label"]) + (
            f" [dim]({entry['reference']})[/dim]" if entry.get("reference") else ""
        )
        mean = entry.get("val_accuracy_mean", entry["val_accuracy"])
        answer = ""
        if entry.get("arch_id") == board.get("recommended"):
            answer = "recommended"
        elif entry.get("arch_id") in top:
            answer = "top group"
        cells = [
            str(entry["rank"]),
            str(entry["number"]),
            label,
            acc(mean),
            _interval(entry.get("val_accuracy_ci95")),
            str(entry.get("n_seeds", 1)),
            acc(entry.get("test_accuracy_mean", entry.get("test_accuracy"))),
            _delta(entry, "none"),
            _delta(entry, "se"),
            _delta(entry, "cbam"),
            _absolute("params", entry),
        ]
        if overhead != "params":
            cells.append(_absolute(overhead, entry))
        cells += [
            pct(entry.get(f"{overhead}_pct")),
            epochs_cell(entry),
            "*" if entry["pareto"] else "",
            answer,
        ]
        table.add_row(*cells)
    return table


def slots_table(info: BackboneInfo) -> Table:
    """A backbone's stages, blocks and the channels each block's attention sees."""
    table = Table(
        title=f"{info.name} ({info.family}): {sum(info.blocks_per_stage)} attention slots, "
        f"designed for {info.input_size}x{info.input_size}"
    )
    table.add_column("stage", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column("channels per block")
    for stage, channels in zip(info.stages, info.block_channels, strict=True):
        table.add_row(str(stage), str(len(channels)), ", ".join(str(c) for c in channels))
    return table
