"""Reads of a search's trial-result rows: progress, pages and leaderboards for the API and the CLI,
and the accuracies at a rung for early stopping.

Every answer comes from our own indexed ``trial_results`` rows; nothing here reads the Optuna
study. The leaderboard ranks a search's completed rows from a narrow column query (a few
milliseconds at 10,000 trials) and then loads only the page it returns in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, String, func, select, type_coerce
from sqlalchemy.orm import aliased

from search.errors import InvalidValue, NotFound
from search.pareto import OVERHEAD_COLUMNS
from search.results.cache import cached, completed
from search.results.convergence import convergence
from search.results.eta import Work, confirm_runs_left, eta_s
from search.results.leaderboard import (
    EVIDENCE_FIELDS,
    confirmed_board,
    deltas,
    exploration_board,
    leaderboard,
)
from search.spec import SearchSpec
from search.stats import wilson_interval
from search.store.models import (
    OVERHEAD_FIELDS,
    Phase,
    ResultState,
    Search,
    SearchState,
    TrialResult,
    WorkerSeen,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.orm import Session

    from search.store.engine import Database

# Columns a trial list may be sorted by (every number a trial has), and the default.
SORT_COLUMNS = (
    "number",
    "val_accuracy",
    "final_val_accuracy",
    "test_accuracy",
    *OVERHEAD_FIELDS,
    "epochs_run",
    "wall_time_s",
    "images_per_s",
    "created_at",
    "finished_at",
)
# What a leaderboard may be ordered by: its rank (accuracy) or a figure of the ranking.
LEADERBOARD_SORTS = ("rank", "number", "val_accuracy", "params", "macs", "latency_ms")
# Big per-row values that lists leave out; a single trial's answer has them.
_DETAIL_ONLY = ("learning_curve", "artifacts")
_EXPLORE_STATES = (
    ResultState.completed,
    ResultState.running,
    ResultState.pruned,
    ResultState.failed,
    ResultState.over_budget,
    ResultState.requeued,
)
_CONFIRM_STATES = (
    ResultState.pending,
    ResultState.running,
    ResultState.completed,
    ResultState.failed,
    ResultState.requeued,
)
_FINISHED = (ResultState.completed, ResultState.pruned, ResultState.over_budget, ResultState.failed)
_UNFINISHED = (ResultState.pending, ResultState.running)


def get_search(db: Database, search_id: str) -> Search:
    with db.session() as session:
        search = session.get(Search, search_id)
    if search is None:
        raise NotFound(f"search {search_id}")
    return search


def list_searches(
    db: Database, *, state: SearchState | None = None, limit: int = 50, offset: int = 0
) -> tuple[int, list[Search]]:
    """Newest first; returns the total (in ``state``) and the page."""
    query = select(Search)
    if state is not None:
        query = query.where(Search.state == state)
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(
            query.order_by(Search.created_at.desc(), Search.id).limit(limit).offset(offset)
        ).all()
    return total, list(rows)


@dataclass(frozen=True)
class Progress:
    """Where a search stands. The counts are of the exploration's trial attempts, ``done`` of
    its budget slots finished; ``confirmation`` counts the confirmation runs by state
    (``pending``: scheduled, not yet claimed). ``val_images`` is the validation split the
    accuracies are measured on, and ``noise_floor_pp`` half the width of one run's 95 % Wilson
    interval at the best accuracy, in points: no single-seed difference smaller than about
    that means anything.

    ``eta_s``: the seconds left, the work left over the rate so far (search.results.eta: the
    exploration's slots and the confirmation's runs, at most, while a race may still stop
    arms); None before anything has trained or once the search is over.
    """

    budget: int
    done: int
    completed: int
    running: int
    pruned: int
    failed: int
    over_budget: int
    requeued: int
    eta_s: float | None
    best: dict[str, Any] | None
    confirmation: dict[str, int]
    val_images: int | None
    noise_floor_pp: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def progress(db: Database, search: Search) -> Progress:
    return progress_of(db, [search])[search.id]


def progress_of(db: Database, searches: list[Search]) -> dict[str, Progress]:
    """The progress of several searches: three queries whatever their number, and the replay
    of the race of each running search whose exploration is over (for its time left)."""
    ids = [search.id for search in searches]
    counts: dict[str, dict[tuple[Phase, ResultState], int]] = {search_id: {} for search_id in ids}
    epochs: dict[str, dict[tuple[Phase, ResultState], int]] = {search_id: {} for search_id in ids}
    # The best completed row of each search: a correlated ORDER BY ... LIMIT 1 walks the
    # covering ranking index (microseconds); a window over every row took ~13 ms at 10k trials.
    top = aliased(TrialResult)
    best_id = (
        select(top.id)
        .where(
            top.search_id == Search.id,
            top.state == ResultState.completed,
            top.val_accuracy.is_not(None),
        )
        .order_by(top.val_accuracy.desc(), top.params, top.number)
        .limit(1)
        .correlate(Search)
        .scalar_subquery()
    )
    with db.session() as session:
        for search_id, phase, state, n, trained in session.execute(
            select(
                TrialResult.search_id,
                TrialResult.phase,
                TrialResult.state,
                func.count(),
                func.coalesce(func.sum(TrialResult.epochs_run), 0),
            )
            .where(TrialResult.search_id.in_(ids))
            .group_by(TrialResult.search_id, TrialResult.phase, TrialResult.state)
        ):
            counts[search_id][(phase, state)] = n
            epochs[search_id][(phase, state)] = int(trained)
        done_slots = dict(
            session.execute(
                select(TrialResult.search_id, func.count(TrialResult.number.distinct()))
                .where(
                    TrialResult.search_id.in_(ids),
                    TrialResult.phase == Phase.explore,
                    TrialResult.state.in_(_FINISHED),
                )
                .group_by(TrialResult.search_id)
            ).all()
        )
        split = dict(
            session.execute(
                select(TrialResult.search_id, func.max(TrialResult.val_images))
                .where(TrialResult.search_id.in_(ids))
                .group_by(TrialResult.search_id)
            ).all()
        )
        best = {
            row.search_id: row
            for row in session.scalars(
                select(TrialResult).where(
                    TrialResult.id.in_(select(best_id).where(Search.id.in_(ids)))
                )
            )
        }
        done = {
            search.id: min(done_slots.get(search.id, 0), search.budget_trials)
            for search in searches
        }
        etas = {
            search.id: _eta(session, search, done[search.id], epochs[search.id], counts[search.id])
            for search in searches
            if search.state in (SearchState.queued, SearchState.running)
        }
    out = {}
    for search in searches:
        finished = done[search.id]
        top = best.get(search.id)
        count = counts[search.id]
        explored = {s.value: count.get((Phase.explore, s), 0) for s in _EXPLORE_STATES}
        confirmed = {s.value: count.get((Phase.confirm, s), 0) for s in _CONFIRM_STATES}
        out[search.id] = Progress(
            budget=search.budget_trials,
            done=finished,
            **explored,
            eta_s=etas.get(search.id),
            best=None if top is None else _summary(top),
            confirmation=confirmed,
            val_images=split.get(search.id),
            noise_floor_pp=_noise_floor(top, split.get(search.id)),
        )
    return out


def _noise_floor(best: TrialResult | None, val_images: int | None) -> float | None:
    if best is None or best.val_accuracy is None:
        return None
    return noise_floor_pp(best.val_accuracy, val_images)


def noise_floor_pp(accuracy: float, val_images: int | None) -> float | None:
    """Half the width of one run's 95 % Wilson interval at ``accuracy``, in points."""
    if not val_images:
        return None
    interval = wilson_interval(accuracy, val_images)
    return None if interval.bounds is None else 50 * (interval.bounds[1] - interval.bounds[0])


def page_noise(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Can the differences on a leaderboard page be told from noise at all? ``spread_pp``: the
    best mean minus the worst on the page (points); ``noise_floor_pp``: one run's noise floor at
    the page's best; ``within_noise``: the whole spread is below that floor, so no order on the
    page means anything without more seeds (None when either is unknown)."""
    means = [e["val_accuracy_mean"] for e in entries if e.get("val_accuracy_mean") is not None]
    if not means:
        return {"spread_pp": None, "noise_floor_pp": None, "within_noise": None}
    best = max(entries, key=lambda e: e.get("val_accuracy_mean") or -1.0)
    spread = 100 * (max(means) - min(means))
    floor = noise_floor_pp(best["val_accuracy_mean"], best.get("val_images"))
    within = None if floor is None or len(means) < 2 else spread < floor
    return {"spread_pp": spread, "noise_floor_pp": floor, "within_noise": within}


def reference_convergence(db: Database, search_id: str) -> dict[str, dict[str, Any]]:
    """Whether each reference's run on the leaderboard (its best confirmed run once confirmed)
    had finished learning (search.results.convergence): where the references had not, no
    comparison at this schedule says what a full training would."""
    ranked = ranking(db, search_id)
    ids = {name: entry["id"] for name, entry in ranked.references.items()}
    rows = _rows_by_id(db, list(ids.values()))
    return {
        name: {"number": rows[i].number, **convergence(rows[i].learning_curve, rows[i].val_images)}
        for name, i in ids.items()
    }


def _eta(
    session: Session,
    search: Search,
    done: int,
    epochs: Mapping[tuple[Phase, ResultState], int],
    counts: Mapping[tuple[Phase, ResultState], int],
) -> float | None:
    spec = SearchSpec.from_dict(search.spec)
    work = Work(
        trained=sum(epochs.values()),
        explore_finished=sum(epochs.get((Phase.explore, s), 0) for s in _FINISHED),
        explore_running=epochs.get((Phase.explore, ResultState.running), 0),
        confirm_running=epochs.get((Phase.confirm, ResultState.running), 0),
    )
    unfinished = sum(counts.get((Phase.confirm, s), 0) for s in _UNFINISHED)
    return eta_s(search, spec, done, work, confirm_runs_left(session, search, spec, unfinished))


def _summary(row: TrialResult) -> dict[str, Any]:
    return {
        "number": row.number,
        "label": row.label,
        "val_accuracy": row.val_accuracy,
        "params": row.params,
        "params_pct": row.params_pct,
    }


def _listed(row: TrialResult) -> dict[str, Any]:
    entry = row.to_dict()
    for key in _DETAIL_ONLY:
        entry.pop(key, None)
    return entry


def trials_page(
    db: Database,
    search_id: str,
    *,
    sort: str = "number",
    descending: bool = False,
    state: ResultState | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """One page of a search's trial attempts sorted by ``sort`` (missing values last); returns
    the total and the rows (without learning curves)."""
    if sort not in SORT_COLUMNS:
        raise InvalidValue("sort", sort, SORT_COLUMNS)
    get_search(db, search_id)
    column = getattr(TrialResult, sort)
    conditions = [TrialResult.search_id == search_id]
    if state is not None:
        conditions.append(TrialResult.state == state)
    # Missing values last; ties in the order the attempts were created (the id, which every
    # index holds: the (search_id, <metric>) indexes then serve the sort without the rows).
    if sort == "number":
        order = [column.desc() if descending else column.asc(), TrialResult.attempt]
    else:
        direction = column.desc() if descending else column.asc()
        order = [direction.nulls_last(), TrialResult.id]
    # The page's ids first (an index scan), then only those rows in full: sorting whole rows
    # (learning curves included) would be most of the time.
    page: Select[Any] = select(TrialResult.id).where(*conditions).order_by(*order)
    with db.session() as session:
        total = session.scalar(select(func.count()).where(*conditions)) or 0
        ids = list(session.scalars(page.limit(limit).offset(offset)))
    found = _rows_by_id(db, ids)
    rows = [found[i] for i in ids if i in found]
    return total, [_listed(row) for row in rows]


def trial(db: Database, search_id: str, number: int, attempt: int | None = None) -> TrialResult:
    """The latest attempt at slot ``number`` (or the given ``attempt``)."""
    get_search(db, search_id)
    query = select(TrialResult).where(
        TrialResult.search_id == search_id, TrialResult.number == number
    )
    if attempt is not None:
        query = query.where(TrialResult.attempt == attempt)
    with db.session() as session:
        row = session.scalars(query.order_by(TrialResult.attempt.desc()).limit(1)).one_or_none()
    if row is None:
        what = f"trial {number}" + (f" attempt {attempt}" if attempt is not None else "")
        raise NotFound(f"{what} of search {search_id}")
    return row


def _check_overhead(overhead: str) -> str:
    if overhead not in OVERHEAD_COLUMNS:
        raise InvalidValue("overhead", overhead, list(OVERHEAD_COLUMNS))
    return overhead


@dataclass(frozen=True)
class Ranking:
    """A search's leaderboard before paging: narrow entries best first, each with its rank,
    Pareto flag and statistics (search.results.leaderboard.Board)."""

    entries: list[dict[str, Any]]
    references: dict[str, dict[str, Any]]
    top_group: list[str]
    recommended: str | None
    confirmed: bool


def ranking(db: Database, search_id: str, overhead: str = "params") -> Ranking:
    """Rank the search's completed rows and flag the Pareto front of accuracy against
    ``overhead``: the confirmation's runs aggregated per architecture once there are any, else
    the exploration's trials.

    Cached per search version (:mod:`search.results.cache`): a leaderboard of an unchanged search
    costs one small query, and a new completed trial one narrow scan of its completed rows."""
    _check_overhead(overhead)
    return cached(db, search_id, ("ranking", overhead), lambda: _rank(db, search_id, overhead))


def _rank(db: Database, search_id: str, overhead: str) -> Ranking:
    table = TrialResult.__table__
    # Core, not ORM rows, and the enum columns read as their plain strings: this runs over
    # every completed trial of the search.
    query = select(
        table.c.id,
        table.c.number,
        table.c.val_accuracy,
        table.c.test_accuracy,
        table.c.params,
        table.c.macs,
        table.c.latency_ms,
        type_coerce(table.c.reference, String).label("reference"),
        type_coerce(table.c.phase, String).label("phase"),
        table.c.arch_id,
        table.c.seed,
        table.c.val_images,
    ).where(*completed(search_id))
    with db.engine.connect() as connection:
        result = connection.execute(query)
        keys = list(result.keys())
        rows = [dict(zip(keys, values, strict=True)) for values in result.all()]
    confirmed = [row for row in rows if row["phase"] == Phase.confirm.value]
    if confirmed:
        confirm = SearchSpec.from_dict(get_search(db, search_id).spec).confirm
        board = confirmed_board(confirmed, overhead, confirm.alpha, confirm.looks)
    else:
        for row in rows:
            row["state"] = "completed"  # what the query selected
        board = exploration_board(leaderboard(rows, [overhead]), overhead)
    return Ranking(
        board.entries,
        {
            name: {key: value for key, value in entry.items() if key != "state"}
            for name, entry in board.references.items()
        },
        board.top_group,
        board.recommended,
        board.confirmed,
    )


# The statistics of a leaderboard entry that are not columns of its row.
_BOARD_FIELDS = (*EVIDENCE_FIELDS, "pareto", "front")


def leaderboard_page(
    db: Database,
    search_id: str,
    *,
    overhead: str = "params",
    limit: int = 20,
    offset: int = 0,
    pareto_only: bool = False,
    sort: str = "rank",
    descending: bool = False,
) -> dict[str, Any]:
    """Ranked completed trials with the Pareto flag (accuracy against ``overhead``) and the
    deltas against the references; ``references`` holds those the search has completed.

    The page is in rank order unless ``sort`` names another of :data:`LEADERBOARD_SORTS`
    (ties, and missing values last, in rank order)."""
    if sort not in LEADERBOARD_SORTS:
        raise InvalidValue("sort", sort, LEADERBOARD_SORTS)
    ranked = ranking(db, search_id, overhead)
    entries = [e for e in ranked.entries if e["pareto"]] if pareto_only else ranked.entries
    if sort != "rank" or descending:
        present = [e for e in entries if e[sort] is not None]
        present.sort(key=lambda e: e[sort], reverse=descending)
        entries = present + [e for e in entries if e[sort] is None]
    page = entries[offset : offset + limit]
    full = _rows_by_id(db, [e["id"] for e in page])
    rows = []
    for entry in page:
        row = _listed(full[entry["id"]])
        row["convergence"] = convergence(full[entry["id"]].learning_curve, row["val_images"])
        row["converged"] = row["convergence"]["converged"]
        row.update(deltas(row, ranked.references, [overhead]))
        row.update(
            (key, value)
            for key, value in entry.items()
            if key in _BOARD_FIELDS or key.startswith(("delta_vs_", "verdict_vs_"))
        )
        rows.append(row)
    return {
        "search_id": search_id,
        "overhead": overhead,
        "total": len(entries),
        "offset": offset,
        "limit": limit,
        "references": ranked.references,
        "entries": rows,
        "confirmed": ranked.confirmed,
        "top_group": ranked.top_group,
        "recommended": ranked.recommended,
        **page_noise(rows),
    }


def _rows_by_id(db: Database, ids: list[int]) -> dict[int, TrialResult]:
    if not ids:
        return {}
    with db.session() as session:
        rows = session.scalars(select(TrialResult).where(TrialResult.id.in_(ids)))
        return {row.id: row for row in rows}


def recommendation(
    db: Database, search_id: str, overhead: str = "params"
) -> tuple[TrialResult, dict[str, Any], Ranking]:
    """The leaderboard's answer: the recommended architecture's best run, its entry (the
    evidence: seeds, interval, verdicts) and the ranking it comes from."""
    ranked = ranking(db, search_id, overhead)
    entry = next((e for e in ranked.entries if e["arch_id"] == ranked.recommended), None)
    if entry is None:
        raise NotFound(f"a completed trial in search {search_id}")
    return _rows_by_id(db, [entry["id"]])[entry["id"]], entry, ranked


def best_trial(
    db: Database, search_id: str, *, overhead: str = "params", max_pct: float | None = None
) -> TrialResult:
    """The completed trial with the highest validation accuracy (ties: fewer parameters, then
    the lower number); with ``max_pct``, among those whose ``overhead`` is at most that many
    percent over the no-attention baseline."""
    _check_overhead(overhead)
    get_search(db, search_id)
    pct = getattr(TrialResult, OVERHEAD_COLUMNS[overhead][1])
    query = select(TrialResult).where(
        TrialResult.search_id == search_id,
        TrialResult.state == ResultState.completed,
        TrialResult.val_accuracy.is_not(None),
    )
    if max_pct is not None:
        query = query.where(pct.is_not(None), pct <= max_pct)
    with db.session() as session:
        row = session.scalars(
            query.order_by(
                TrialResult.val_accuracy.desc(), TrialResult.params, TrialResult.number
            ).limit(1)
        ).one_or_none()
    if row is None:
        within = f" within {max_pct:g}% {overhead} overhead" if max_pct is not None else ""
        raise NotFound(f"a completed trial{within} in search {search_id}")
    return row


def counts_by_state(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    """Searches by state and trial attempts by state, over the whole database."""
    with db.session() as session:
        searches = session.execute(select(Search.state, func.count()).group_by(Search.state))
        trials = session.execute(
            select(TrialResult.state, func.count()).group_by(TrialResult.state)
        )
        return (
            {state.value: n for state, n in searches},
            {state.value: n for state, n in trials},
        )


def completed_since(db: Database, since: datetime) -> int:
    with db.session() as session:
        return (
            session.scalar(
                select(func.count()).where(
                    TrialResult.state == ResultState.completed, TrialResult.finished_at >= since
                )
            )
            or 0
        )


def workers_seen_since(db: Database, since: datetime) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).where(WorkerSeen.last_seen >= since)) or 0


def rung_accuracies(db: Database, search_id: str, epoch: int, exclude_row: int) -> list[float]:
    """The validation accuracies at ``epoch`` of the search's running, completed and pruned
    trials (from their rows' learning curves), but for row ``exclude_row``."""
    query = select(TrialResult.learning_curve).where(
        TrialResult.search_id == search_id,
        TrialResult.id != exclude_row,
        TrialResult.epochs_run >= epoch,
        TrialResult.state.in_([ResultState.running, ResultState.completed, ResultState.pruned]),
    )
    with db.session() as session:
        curves = session.scalars(query).all()
    return [float(c[epoch - 1]["val_accuracy"]) for c in curves if len(c) >= epoch]
