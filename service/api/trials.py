"""A search's trials: pages sorted by any metric, one trial in full, the leaderboard, the best."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Query

from search.leaderboard import OVERHEAD_COLUMNS
from search.records import ResultState
from search.results import SORT_COLUMNS, best_trial, leaderboard_page, trial, trials_page
from service.api.deps import DB, Reader
from service.schemas import LeaderboardOut, Page

router = APIRouter(prefix="/searches/{search_id}", tags=["trials"], dependencies=[Reader])

SortColumn = Enum("SortColumn", {name: name for name in SORT_COLUMNS}, type=str)  # type: ignore[misc]
Overhead = Enum("Overhead", {name: name for name in OVERHEAD_COLUMNS}, type=str)  # type: ignore[misc]


class Order(str, Enum):
    asc = "asc"
    desc = "desc"


def _trial_out(row: Any) -> dict[str, Any]:
    out = row.to_dict()
    out["files"] = sorted((row.artifacts or {}).keys()) + (["model.onnx"] if row.artifacts else [])
    return out


@router.get("/trials")
def list_trials(
    db: DB,
    search_id: str,
    sort: SortColumn = SortColumn("number"),  # type: ignore[valid-type]
    order: Order = Order.asc,
    state: ResultState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[dict[str, Any]]:
    """Trial attempts sorted by any metric (missing values last), without learning curves."""
    total, items = trials_page(
        db,
        search_id,
        sort=sort.value,
        descending=order is Order.desc,
        state=state,
        limit=limit,
        offset=offset,
    )
    return Page[dict[str, Any]](total=total, offset=offset, limit=limit, items=items)


@router.get("/trials/{number}")
def show_trial(
    db: DB, search_id: str, number: int, attempt: Annotated[int | None, Query(ge=0)] = None
) -> dict[str, Any]:
    """One trial (its latest attempt unless ``attempt`` is given): architecture, every metric,
    the learning curve, state, failure reason and the files it can be downloaded as."""
    return _trial_out(trial(db, search_id, number, attempt))


@router.get("/leaderboard")
def leaderboard(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    pareto_only: bool = False,
) -> LeaderboardOut:
    """Completed trials ranked by validation accuracy, flagged when on the Pareto front of
    accuracy against ``overhead``, with deltas against the none / SE / CBAM references."""
    page = leaderboard_page(
        db,
        search_id,
        overhead=overhead.value,
        limit=limit,
        offset=offset,
        pareto_only=pareto_only,
    )
    return LeaderboardOut(**page)


@router.get("/best")
def best(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    max_pct: Annotated[
        float | None,
        Query(description="Only trials at most this many percent over the no-attention model."),
    ] = None,
) -> dict[str, Any]:
    """The best completed trial: highest accuracy, or highest within an overhead budget."""
    return _trial_out(best_trial(db, search_id, overhead=overhead.value, max_pct=max_pct))
