"""A search's trials: pages sorted by any metric, one trial in full, the leaderboard, the best."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Query

from search.results.leaderboard import evidence
from search.results.queries import (
    LEADERBOARD_SORTS,
    SORT_COLUMNS,
    best_trial,
    leaderboard_page,
    recommendation,
    trial,
    trials_page,
)
from search.store.models import ResultState
from service.api.deps import DB, Attempt, Offset, Overhead, Reader, TrialNumber
from service.api.schemas import BestOut, LeaderboardOut, Page, TrialOut, TrialSummaryOut

router = APIRouter(prefix="/searches/{search_id}", tags=["trials"], dependencies=[Reader])


def _choices(name: str, values: tuple[str, ...] | dict[str, object]) -> type[Enum]:
    """A str Enum of ``values``, so that FastAPI validates the query and lists the choices."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


SortColumn = _choices("SortColumn", SORT_COLUMNS)
LeaderboardSort = _choices("LeaderboardSort", LEADERBOARD_SORTS)


class Order(str, Enum):
    asc = "asc"
    desc = "desc"


def _trial_out(row: Any) -> dict[str, Any]:
    out = row.to_dict()
    stored = sorted((row.artifacts or {}).keys())
    out["files"] = stored + (["model.onnx"] if "weights.safetensors" in stored else [])
    return out


# Routes return plain dicts and name their model in the decorator: FastAPI then validates and
# serialises each answer once (a model built here would be validated a second time).


@router.get("/trials", response_model=Page[TrialSummaryOut])
def list_trials(
    db: DB,
    search_id: str,
    sort: SortColumn = SortColumn("number"),  # type: ignore[valid-type]
    order: Order = Order.asc,
    state: ResultState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
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
    return {"total": total, "offset": offset, "limit": limit, "items": items}


@router.get("/trials/{number}", response_model=TrialOut)
def show_trial(
    db: DB, search_id: str, number: TrialNumber, attempt: Attempt = None
) -> dict[str, Any]:
    """One trial (its latest attempt unless ``attempt`` is given): architecture, every metric,
    the learning curve, state, failure reason and the files it can be downloaded as."""
    return _trial_out(trial(db, search_id, number, attempt))


@router.get("/leaderboard", response_model=LeaderboardOut, response_model_exclude_unset=True)
def leaderboard(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Offset = 0,
    pareto_only: bool = False,
    sort: LeaderboardSort = LeaderboardSort("rank"),  # type: ignore[valid-type]
    order: Order = Order.asc,
) -> dict[str, Any]:
    """Completed trials ranked by validation accuracy, flagged when on the Pareto front of
    accuracy against ``overhead``, with deltas against the none / SE / CBAM references."""
    page = leaderboard_page(
        db,
        search_id,
        overhead=overhead.value,
        limit=limit,
        offset=offset,
        pareto_only=pareto_only,
        sort=sort.value,
        descending=order is Order.desc,
    )
    return page


@router.get("/best", response_model=BestOut, response_model_exclude_unset=True)
def best(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    max_pct: Annotated[
        float | None,
        Query(description="Only trials at most this many percent over the no-attention model."),
    ] = None,
) -> dict[str, Any]:
    """The search's answer: the recommended architecture's best run (the cheapest by
    ``overhead`` of those not significantly worse than the best, once confirmed; the most
    accurate trial before), with ``evidence``: its seeds, validation mean and interval, its
    held-out test accuracy over the same seeds (mean and interval), verdicts against the
    references, the top group. With ``max_pct``: the most accurate trial within that
    overhead budget."""
    if max_pct is not None:
        return _trial_out(best_trial(db, search_id, overhead=overhead.value, max_pct=max_pct))
    row, entry, ranked = recommendation(db, search_id, overhead.value)
    return {**_trial_out(row), "evidence": evidence(entry, ranked.confirmed, ranked.top_group)}
