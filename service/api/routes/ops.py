"""Operations endpoints at the root, outside ``/api/v1`` and without auth, for probes and
Prometheus: ``/healthz`` (the process answers), ``/readyz`` (the database answers, schema
current), ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from search.results.queries import completed_since, counts_by_state, workers_seen_since
from search.store.engine import Database
from search.store.models import ResultState, SearchState, utcnow

router = APIRouter(tags=["operations"])

RATE_WINDOW = timedelta(minutes=5)
WORKER_WINDOW = timedelta(minutes=1)


class _StateCollector(Collector):
    """Gauges read from the database at each scrape (the rows are the truth, not counters kept
    in one process: workers run elsewhere)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        searches, trials = counts_by_state(self.db)
        now = utcnow()
        search_gauge = GaugeMetricFamily(
            "cbam_nas_searches", "Searches by state.", labels=["state"]
        )
        for state in SearchState:
            search_gauge.add_metric([state.value], searches.get(state.value, 0))
        trial_gauge = GaugeMetricFamily(
            "cbam_nas_trials", "Trial attempts by state.", labels=["state"]
        )
        for result_state in ResultState:
            trial_gauge.add_metric([result_state.value], trials.get(result_state.value, 0))
        window = RATE_WINDOW.total_seconds()
        rate = GaugeMetricFamily(
            "cbam_nas_trials_completed_per_second",
            f"Trials completed per second over the last {window:g} s.",
            value=completed_since(self.db, now - RATE_WINDOW) / window,
        )
        workers = GaugeMetricFamily(
            "cbam_nas_workers_seen",
            f"Workers that reported in the last {WORKER_WINDOW.total_seconds():g} s.",
            value=workers_seen_since(self.db, now - WORKER_WINDOW),
        )
        yield from (search_gauge, trial_gauge, rate, workers)


def metrics_registry(db: Database) -> tuple[CollectorRegistry, Histogram]:
    """A registry of this app's own (not the process-global one, so apps in one process, as in
    tests, do not collide) and its request-latency histogram."""
    registry = CollectorRegistry()
    registry.register(_StateCollector(db))
    latency = Histogram(
        "cbam_nas_request_seconds",
        "API request latency.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    return registry, latency


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Database unreachable or not migrated."}})
def readyz(request: Request) -> Response:
    """The database answers and its schema is current."""
    db: Database = request.app.state.db
    try:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = db.current_revision()
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "detail": f"database: {type(exc).__name__}: {exc}"[:500]},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    if revision != request.app.state.schema_head:
        return JSONResponse(
            {"status": "unavailable", "detail": f"schema at {revision}, not migrated"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    return JSONResponse({"status": "ok", "database": db.dialect, "schema": revision})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
