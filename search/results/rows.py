"""Completed trial rows as the analyses read them: narrow column loads, and the facts of a row
that never change (its architecture, label, overhead percentages), kept per process.

The analyses (:mod:`~search.results.scatter`, :mod:`~search.results.knob_views`,
:mod:`~search.results.ablation`, :mod:`~search.results.curves`) read our own indexed
``trial_results`` rows: completed rows with a validation accuracy. Their answers are cached in the
process by the search's *version* (:mod:`search.results.cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from search.errors import InvalidValue
from search.pareto import OVERHEAD_COLUMNS
from search.results.cache import Cache, completed
from search.space import Architecture
from search.store.models import TrialResult

if TYPE_CHECKING:
    from search.store.engine import Database

Row = dict[str, Any]


def check_overhead(overhead: str) -> tuple[str, str]:
    if overhead not in OVERHEAD_COLUMNS:
        raise InvalidValue("overhead", overhead, list(OVERHEAD_COLUMNS))
    return OVERHEAD_COLUMNS[overhead]


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(name, value, "an integer >= 1")
    return value


def load_rows(db: Database, search_id: str, *columns: Any) -> list[Row]:
    """The completed rows of the search as dicts of ``columns``; references as strings."""
    with db.session() as session:
        result = session.execute(select(*columns).where(*completed(search_id)))
        keys = list(result.keys())
        rows = [dict(zip(keys, values, strict=True)) for values in result.all()]
    for row in rows:
        if "reference" in row:
            row["reference"] = row["reference"].value if row["reference"] else None
    return rows


def parse_architecture(data: Mapping[str, Any] | None) -> Architecture | None:
    try:
        return Architecture.from_dict(data or {})
    except (InvalidValue, TypeError):
        return None


_IN_CHUNK = 500


def _by_id(db: Database, search_id: str, ids: Sequence[int], *columns: Any) -> dict[int, Row]:
    """Row id -> ``columns`` of those completed rows of the search: in chunks of ids, or in
    one pass over the search when they are most of it."""
    query = select(TrialResult.id.label("id"), *columns)
    with db.engine.connect() as connection:
        if len(ids) > 2 * _IN_CHUNK:
            chunks = [connection.execute(query.where(*completed(search_id)))]
        else:
            chunks = [
                connection.execute(query.where(TrialResult.id.in_(ids[start : start + _IN_CHUNK])))
                for start in range(0, len(ids), _IN_CHUNK)
            ]
        keys = ["id", *(column.key for column in columns)]
        return {
            row[0]: dict(zip(keys, row, strict=True)) for chunk in chunks for row in chunk.all()
        }


class _RowFacts:
    """What a completed row holds and never changes (its architecture, label, overhead
    percentages), read once per process: a search's answers after a new trial read that
    trial's row only. Kept per (database, search), for the last few searches."""

    def __init__(self, read: Callable[[Row], Any], *columns: Any) -> None:
        self.read = read
        self.columns = columns
        self.searches = Cache(maxsize=8)  # about 10 MB per 10,000 rows

    def get(self, db: Database, search_id: str, ids: Sequence[int]) -> dict[int, Any]:
        """Row id -> fact, for every id of ``ids`` (rows of the search)."""
        known: dict[int, Any] = self.searches.get_or_compute((repr(db), search_id), dict)
        missing = [i for i in ids if i not in known]
        if missing:
            for row_id, row in _by_id(db, search_id, missing, *self.columns).items():
                known.setdefault(row_id, self.read(row))
        return {i: known[i] for i in ids if i in known}


_ARCHITECTURES = _RowFacts(
    lambda row: parse_architecture(row["architecture"]), TrialResult.architecture
)
_POINT_DETAILS = _RowFacts(
    dict,
    TrialResult.label,
    *(getattr(TrialResult, pct) for _, pct in OVERHEAD_COLUMNS.values()),
)


def architectures(db: Database, search_id: str, ids: Sequence[int]) -> dict[int, Any]:
    """Row id -> Architecture (None where unreadable) for every id of ``ids``."""
    return _ARCHITECTURES.get(db, search_id, ids)


def point_details(db: Database, search_id: str, ids: Sequence[int]) -> dict[int, Row]:
    """Row id -> its label and overhead percentages for every id of ``ids``."""
    return _POINT_DETAILS.get(db, search_id, ids)
