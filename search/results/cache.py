"""Answers computed from a search's completed trial rows, cached in the process.

A search's *version* is the number of its completed rows and the latest ``finished_at`` among
them (one indexed query): a new completed trial changes it, so a cached answer is never stale
for longer than that query takes to notice, and a dashboard polling an unchanged search costs
one small query per call. Cached answers are shared between callers: treat them as read-only.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from search.errors import NotFound
from search.store.models import ResultState, Search, TrialResult

if TYPE_CHECKING:
    from search.store.engine import Database


class Cache:
    """A small thread-safe LRU map that computes each missing key once: a caller asking for a
    key that another is computing waits for that answer."""

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[Hashable, threading.Lock] = {}
        _CACHES.add(self)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            computing = self._computing.setdefault(key, threading.Lock())
        with computing:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                value = compute()
            finally:
                with self._lock:
                    self._computing.pop(key, None)
            with self._lock:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHES: weakref.WeakSet[Cache] = weakref.WeakSet()


def clear_all() -> None:
    """Forget every answer cached in this process (tests; a process that rewrites rows)."""
    for cache in list(_CACHES):
        cache.clear()


CACHE = Cache()


def completed(search_id: str) -> Any:
    """The filter of a search's rankable rows: completed, with a validation accuracy."""
    return (
        TrialResult.search_id == search_id,
        TrialResult.state == ResultState.completed,
        TrialResult.val_accuracy.is_not(None),
    )


def version(db: Database, search_id: str) -> tuple[int, datetime | None]:
    """(completed rows, latest finished_at) of the search; NotFound when there is no search."""
    with db.session() as session:
        if session.scalar(select(Search.id).where(Search.id == search_id)) is None:
            raise NotFound(f"search {search_id}")
        count, latest = session.execute(
            select(func.count(), func.max(TrialResult.finished_at)).where(*completed(search_id))
        ).one()
    return int(count or 0), latest


def cached(db: Database, search_id: str, what: Hashable, compute: Callable[[], Any]) -> Any:
    key = (repr(db), search_id, version(db, search_id), what)
    return CACHE.get_or_compute(key, compute)
