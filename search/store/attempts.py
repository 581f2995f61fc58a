"""Which attempts of a search run again: a slot whose attempt was handed back (``requeued``) or
failed runs again as attempt + 1 while it has retries left. Hand-backs by a signal do not count
against the retries; lost workers (swept: :data:`LOST_REASON`) and failures do."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, exists, func, or_, select
from sqlalchemy.orm import aliased

from search.store.models import ResultState, TrialResult

LOST_REASON = "worker lost"
"""How a swept attempt's ``failure_reason`` starts: it counts against the retries."""


def _counts_against_retries(row: Any) -> ColumnElement[bool]:
    return or_(
        row.state == ResultState.failed,
        and_(row.state == ResultState.requeued, row.failure_reason.like(f"{LOST_REASON}%")),
    )


def pending_retries(search_id: str, max_retries: int) -> Any:
    """The select of the search's attempts that should run again: requeued or failed, without a
    next attempt yet, with retries left."""
    return _pending_retries().params(search_id=search_id, max_retries=max_retries)


@functools.cache
def _pending_retries() -> Any:
    # Built once: aliasing a table proxies each of its columns, milliseconds per build, and
    # every claim and completion check asks this.
    row, later, counted = (aliased(TrialResult) for _ in range(3))
    has_next = exists().where(
        later.search_id == row.search_id,
        later.number == row.number,
        later.attempt == row.attempt + 1,
    )
    failures = (
        select(func.count())
        .where(
            counted.search_id == row.search_id,
            counted.number == row.number,
            _counts_against_retries(counted),
        )
        .scalar_subquery()
    )
    return (
        select(row)
        .where(
            row.search_id == bindparam("search_id"),
            row.state.in_([ResultState.requeued, ResultState.failed]),
            ~has_next,
            failures <= bindparam("max_retries"),
        )
        .order_by(row.number)
    )
