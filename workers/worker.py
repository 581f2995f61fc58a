"""The worker: claim a trial, ask the study, measure, train, tell, store the artifacts; repeat.

Claims. A new slot of a search's budget is claimed by one conditional update,
``claimed = claimed + 1 WHERE claimed < budget_trials``, in the transaction that inserts the
slot's trial-result row, so that the budget is never exceeded however many workers race. A slot
whose attempt was handed back (``requeued``: its worker died or was stopped) or failed is run
again as attempt + 1 without a new slot; inserting that row is the claim, made atomic by the
unique (search, number, attempt) constraint. A requeued attempt runs again with the same Optuna
parameters (:func:`search.study.studies.retry_trial`), a failed one (e.g. a diverging loss) draws anew;
retries are bounded by ``budget.max_retries`` (hand-backs by a signal do not count). Among the
searches with work, a worker takes the one with the fewest trials in flight relative to its budget.

Liveness. Each trial row's ``heartbeat_at`` is refreshed every ``heartbeat_interval_s`` by a
background thread and at every epoch; the worker's own row (``workers``) is written with each claim
and by that thread. Any worker looking for work sweeps (at most every quarter of its grace period,
and at most 5 s apart) rows whose heartbeat is older than its ``grace_period_s``: the attempt is
requeued ("worker lost"), its Optuna trial failed, and the slot runs again. A worker that finds its
own row swept stops that trial. SIGTERM/SIGINT stop training at the next epoch boundary, hand the
trial back at once (requeued, "worker stopped") and end the worker with status 0. A cancelled
search is noticed at the next epoch boundary.

Database outages (a restart, a failover). During a trial every read and write of the database
is retried through transient errors with backoff (:meth:`search.store.engine.Database.retrying`) for up
to the settings' ``db_retry_s``: training goes on meanwhile, the worker waits at the next epoch
boundary and resumes; if the database stays away longer, the worker exits with status 1 and its
trial is re-run once its heartbeat is older than the grace period. Between trials the worker
keeps looking for work every ``poll_interval_s`` however long the outage. During an outage the
heartbeat thread tries every 0.5 s, so that the first heartbeat after it comes at once. Missed
heartbeats mean nothing while the database was away, so a worker sweeps only once the database
has answered for a whole grace period: not while its own calls fail nor within a grace period
after they work again, and on PostgreSQL not within a grace period of the server's start (by the
server's clock, ``pg_postmaster_start_time()``). The rule assumes a grace period longer than a
heartbeat interval plus a second; a worker cut off from a database that others still reach is
swept as a dead one is.

A search is completed, in one conditional update, once every slot is claimed (or its wall-clock
budget has passed), no trial is running and no retry is pending: by the next claim of any worker
that reads it so (the worker that ran its last trial, at the latest), or by a worker that stops.

Per trial, coordination costs a claim (one transaction: the searches read, the slot claimed,
the trial-result row inserted, the worker's row written), Optuna's ask (the references are
taken from the study's queue until a worker finds it empty; then new trials only), the sampled
parameters written in one transaction (:func:`search.study.studies.params_written_at_once`), the
architecture written to the row, Optuna's tell, and one update closing the row with its figures.

Dry runs (``WorkerOptions.dry_run``, ``cbam-nas worker --dry-run``) go through exactly this path
(claim, ask, row updates, tell, completion) but record made-up metrics instead of loading data,
measuring and training (:func:`dry_run_figures`), after ``WorkerOptions.dry_run_seconds`` of sleep
in place of training, and store no artifacts: load tests and ``benchmarks/coordination.py`` use
them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import ColumnElement, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from search.attention_maps import NORMALISATION
from search.errors import InvalidValue
from search.overhead import OverheadReport, check_device, measure
from search.settings import Settings, get_settings
from search.space import Architecture
from search.spec import SearchSpec
from search.store.artifacts import ARTIFACT_FILES, SAMPLES_FILE, artifact_store
from search.store.engine import RETRY_FIRST_DELAY_S, Database, is_transient, open_database
from search.store.models import (
    OVERHEAD_FIELDS,
    ResultState,
    Search,
    SearchState,
    TrialResult,
    WorkerSeen,
    utcnow,
)
from search.study.studies import (
    EpochContext,
    architecture_for,
    constraint_value,
    created_trial,
    early_stopping_policy,
    frozen_trial,
    load_study,
    make_sampler,
    objective_values,
    retry_trial,
    set_constraint,
    tell_trial,
)
from workers.data import DatasetNotFound, DatasetTensors, StreamingData, load_dataset
from workers.train import EpochReport, StopTraining, TrainResult, TrialFailed, train

if TYPE_CHECKING:
    from rich.console import Console

try:
    import fcntl
except ImportError:  # not POSIX: asks on one SQLite file are then not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cbam_nas.worker")

ARTIFACTS_ATTR = "artifacts"
SAMPLE_IMAGES = 8
"""How many validation images are stored with each completed trial (the dashboard's attention
pictures are computed from them)."""
LOST_REASON = "worker lost"
STOPPED_REASON = "worker stopped"
CANCELLED_REASON = "search cancelled"
FINISHED_SEARCH_STATES = (SearchState.completed, SearchState.cancelled, SearchState.failed)
_ACTIVE_SEARCH_STATES = (SearchState.queued, SearchState.running)
_RETRY_STATES = (ResultState.requeued, ResultState.failed)
# A dry run's made-up figures of the backbone without attention: params, MACs, latency in ms.
DRY_RUN_BASELINE = (272_474, 40_813_184, 2.0)
SWEEP_INTERVAL_S = 5.0
"""The longest time between two sweeps for lost trials of a worker looking for work."""


@dataclass
class WorkerOptions:
    """How a worker runs. ``None`` for ``database_url``/``artifacts_dir`` means the settings'."""

    database_url: str | None = None
    artifacts_dir: Path | None = None
    device: str = "cpu"
    search_id: str | None = None
    max_trials: int | None = None
    name: str | None = None
    grace_period_s: float = 60.0
    heartbeat_interval_s: float = 10.0
    poll_interval_s: float = 2.0
    exit_when_idle: bool = False
    latency_batch: int = 1
    latency_repeats: int = 15
    threads: int | None = None
    progress: bool = False
    dry_run: bool = False
    """Coordination only: claim, ask and tell with made-up metrics (:func:`dry_run_figures`)
    without loading data, measuring or training; no artifacts. For load tests and
    ``benchmarks/coordination.py``, never for a real search."""
    dry_run_seconds: float = 0.0
    """With ``dry_run``: how long each trial holds the worker in place of training (a sleep, no
    CPU; heartbeats and signals as in training), so that workers stand in for GPU workers."""


@dataclass
class Claim:
    """One attempt this worker holds. ``retry_of`` is the Optuna number whose parameters the
    attempt re-runs (None: ask the study)."""

    search_id: str
    study_name: str
    spec: SearchSpec
    row_id: int
    number: int
    attempt: int
    retry_of: int | None = None
    label: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.label = f"search {self.search_id[:8]} trial {self.number}.{self.attempt}"


class SearchFailed(Exception):
    """The search cannot run at all (e.g. its dataset is missing): fail the search, not a trial."""


# -- claims, retries, completion ----------------------------------------------------------


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


@contextlib.contextmanager
def sqlite_ask_lock(db: Database) -> Iterator[None]:
    """Serialise taking trials from a study's queue between the workers of one SQLite file.

    Optuna pops an enqueued trial by reading it WAITING, then marking it RUNNING under a
    ``SELECT ... FOR UPDATE`` that SQLite ignores, and Python's sqlite3 opens the transaction
    only at the write: two workers asking at once could both take the same enqueued trial (and
    tell it twice). PostgreSQL's row lock prevents that; on SQLite a lock file beside the
    database does."""
    path = db.sqlite_path
    if path is None or fcntl is None:
        yield
        return
    with path.with_name(path.name + ".ask.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _deadline_passed(search: Search, spec: SearchSpec) -> bool:
    limit = spec.budget.wall_clock_s
    if limit is None or search.started_at is None:
        return False
    return utcnow() - search.started_at > timedelta(seconds=limit)


def maybe_complete(db: Database, search_id: str) -> bool:
    """Mark the search completed if nothing is left to run; True if this call did."""
    return db.retrying(lambda: _maybe_complete(db, search_id), what="completing a search")


def _maybe_complete(db: Database, search_id: str) -> bool:
    with db.session() as session:
        search = session.get(Search, search_id)
        if search is None or search.state != SearchState.running:
            return False
        spec = SearchSpec.from_dict(search.spec)
        running = exists().where(
            TrialResult.search_id == search_id, TrialResult.state == ResultState.running
        )
        conditions = [Search.id == search_id, Search.state == SearchState.running, ~running]
        if not _deadline_passed(search, spec):
            pending = pending_retries(search_id, spec.budget.max_retries).exists()
            conditions += [Search.claimed >= Search.budget_trials, ~pending]
        now = utcnow()
        result = session.execute(
            update(Search)
            .where(*conditions)
            .values(state=SearchState.completed, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        done = result.rowcount == 1
    if done:
        log.info("search %s completed", search_id[:8])
    return done


def _new_row(search: Search, number: int, attempt: int, worker: str, device: str) -> TrialResult:
    now = utcnow()
    return TrialResult(
        search_id=search.id,
        number=number,
        attempt=attempt,
        architecture={},
        arch_id="",
        state=ResultState.running,
        device=device,
        worker=worker,
        learning_curve=[],
        heartbeat_at=now,
        created_at=now,
    )


def _claim_retry(
    db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    with db.session() as session:
        candidates = session.scalars(pending_retries(search.id, spec.budget.max_retries)).all()
    for previous in candidates:
        try:
            with db.session() as session:
                row = _new_row(search, previous.number, previous.attempt + 1, worker, device)
                if previous.state == ResultState.requeued:
                    row.architecture, row.arch_id = previous.architecture, previous.arch_id
                    row.label, row.reference = previous.label, previous.reference
                session.add(row)
                session.flush()
                row_id = row.id
        except IntegrityError:
            continue  # another worker took this retry
        same_params = previous.state == ResultState.requeued
        return Claim(
            search.id,
            search.study_name,
            spec,
            row_id,
            previous.number,
            previous.attempt + 1,
            previous.optuna_number if same_params else None,
        )
    return None


def _claim_slot(
    db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    with db.session() as session:
        return _claim_slot_in(session, db, search, spec, worker, device)


def _claim_slot_in(
    session: Session, db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    """Claim a new slot of ``search`` in ``session``'s transaction (see the module docstring)."""
    now = utcnow()
    claim = (
        update(Search)
        .where(
            Search.id == search.id,
            Search.claimed < Search.budget_trials,
            Search.state.in_(_ACTIVE_SEARCH_STATES),
        )
        .values(
            claimed=Search.claimed + 1,
            state=SearchState.running,
            started_at=func.coalesce(Search.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if db.engine.dialect.update_returning:  # PostgreSQL, SQLite >= 3.35: one round trip
        claimed = session.scalar(claim.returning(Search.claimed))
    else:
        result = session.execute(claim)
        claimed = None
        if result.rowcount == 1:
            claimed = session.scalar(select(Search.claimed).where(Search.id == search.id))
    if claimed is None:
        return None
    number = claimed - 1
    row = _new_row(search, number, 0, worker, device)
    session.add(row)
    session.flush()
    return Claim(search.id, search.study_name, spec, row.id, number, 0)


def _seen_statement(db: Database, **values: Any) -> Any:
    """One statement that inserts or updates a worker's liveness row (``values`` has its id)."""
    if db.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(WorkerSeen).values(**values)
    return statement.on_conflict_do_update(
        index_elements=[WorkerSeen.id],
        set_={name: statement.excluded[name] for name in values if name != "id"},
    )


def _seen_values(seen: dict[str, Any], claim: Claim | None) -> dict[str, Any]:
    return {
        **seen,
        "last_seen": utcnow(),
        "current_search_id": claim.search_id if claim else None,
        "current_trial": claim.number if claim else None,
    }


def claim_trial(
    db: Database,
    worker: str,
    device: str,
    search_id: str | None = None,
    *,
    seen: dict[str, Any] | None = None,
) -> Claim | None:
    """Claim the next attempt of the fairest search with work left (see the module docstring).

    One transaction reads the active searches and their attempts in flight and claims a new
    slot of the fairest search that has one, unless a search before it may have a retry
    pending (or its wall-clock budget is gone): then, or when that claim loses a race, the
    searches are gone through in order, one transaction per attempt. A search that looks
    finished in what was read (every slot claimed or its wall-clock budget gone, nothing
    running) is completed on the way (:func:`maybe_complete`), so that workers need no
    completion check after each trial. With ``seen`` (the worker's ``id``, ``host`` and
    ``device``) the worker's liveness row is written in that first transaction, naming the
    claimed trial (or none)."""
    tried: str | None = None
    with db.session() as session:
        query = select(Search).where(Search.state.in_(_ACTIVE_SEARCH_STATES))
        if search_id is not None:
            query = query.where(Search.id == search_id)
        searches = session.scalars(query).all()
        counts = session.execute(
            select(TrialResult.search_id, TrialResult.state, func.count())
            .where(
                TrialResult.search_id.in_([s.id for s in searches]),
                TrialResult.state.in_((*_RETRY_STATES, ResultState.running)),
            )
            .group_by(TrialResult.search_id, TrialResult.state)
        ).all()
        in_flight = {s: n for s, state, n in counts if state == ResultState.running}
        # Searches without a requeued or failed attempt have no retry to look for.
        may_retry = {s for s, state, _ in counts if state in _RETRY_STATES}

        def fairness(search: Search) -> tuple[float, float, float]:
            budget = max(1, search.budget_trials)
            return (in_flight.get(search.id, 0) / budget, search.claimed / budget, random.random())

        ordered = [(search, SearchSpec.from_dict(search.spec)) for search in searches]
        ordered.sort(key=lambda pair: fairness(pair[0]))
        done = [
            search.id
            for search, spec in ordered
            if search.state == SearchState.running
            and not in_flight.get(search.id)
            and (search.claimed >= search.budget_trials or _deadline_passed(search, spec))
        ]
        claim = None
        for search, spec in ordered:
            if search.id in may_retry or _deadline_passed(search, spec):
                break  # a retry or a completion to look at first: the loop below
            if search.claimed < search.budget_trials:
                tried = search.id
                claim = _claim_slot_in(session, db, search, spec, worker, device)
                break
        if seen is not None:
            session.execute(_seen_statement(db, **_seen_values(seen, claim)))
    completed = set()
    for finished in done:
        try:
            if maybe_complete(db, finished):
                completed.add(finished)
        except Exception as exc:
            if claim is None or not is_transient(exc):
                raise
            break  # keep the claim: a later claim completes the search
    if claim is not None:
        return claim
    for search, spec in ordered:
        if search.id in completed:
            continue
        if _deadline_passed(search, spec):
            if search.id not in done:
                maybe_complete(db, search.id)
            continue
        if search.id in may_retry:
            claim = _claim_retry(db, search, spec, worker, device)
        if claim is None and search.id != tried:
            claim = _claim_slot(db, search, spec, worker, device)
        if claim is not None:
            if seen is not None:
                with db.session() as session:
                    session.execute(_seen_statement(db, **_seen_values(seen, claim)))
            return claim
        # Nothing to claim: the search may be over (e.g. its last lost trial is out of retries).
        if search.id not in done:
            maybe_complete(db, search.id)
    return None


def tell_failed(db: Database, study_name: str, optuna_number: int | None) -> None:
    """Fail an Optuna trial by number unless it is finished already."""
    if optuna_number is None:
        return

    def tell() -> None:
        study = optuna.load_study(study_name=study_name, storage=db.optuna_storage())
        study.tell(optuna_number, state=TrialState.FAIL, skip_if_finished=True)

    db.retrying(tell, what="failing a trial")


def sweep_lost(db: Database, grace_period_s: float) -> list[int]:
    """Requeue running attempts whose heartbeat is older than the grace period; returns the row
    ids this call requeued (another worker sweeping at the same time takes the others).

    Nothing is swept until the database has answered for a whole grace period (see the module
    docstring): heartbeats missed while it was away say nothing about their workers."""
    if not db.available_for(grace_period_s):
        return []
    cutoff = utcnow() - timedelta(seconds=grace_period_s)
    with db.session() as session:
        stale = session.execute(
            select(TrialResult.id, TrialResult.optuna_number, Search.study_name)
            .join(Search, Search.id == TrialResult.search_id)
            .where(TrialResult.state == ResultState.running, TrialResult.heartbeat_at < cutoff)
        ).all()
    swept = []
    for row_id, optuna_number, study_name in stale:
        with db.session() as session:
            result = session.execute(
                update(TrialResult)
                .where(
                    TrialResult.id == row_id,
                    TrialResult.state == ResultState.running,
                    TrialResult.heartbeat_at < cutoff,
                )
                .values(
                    state=ResultState.requeued,
                    failure_reason=f"{LOST_REASON}: no heartbeat for {grace_period_s:g} s",
                    finished_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
        if result.rowcount == 1:
            log.warning("trial row %d lost its worker: requeued", row_id)
            tell_failed(db, study_name, optuna_number)
            swept.append(row_id)
    return swept


def sweep_interval_s(grace_period_s: float) -> float:
    """How often a worker looking for work sweeps for lost trials: a quarter of the grace
    period, at most :data:`SWEEP_INTERVAL_S`; a lost trial is requeued within its grace period
    plus this."""
    return min(grace_period_s / 4, SWEEP_INTERVAL_S)


def _close_row(db: Database, row_id: int, **values: Any) -> TrialResult | None:
    """Set columns of a running trial-result row (its final state and figures) and return what
    the trial's log line shows (label, accuracy, params %, epochs), one round trip where the
    database returns updated rows; None when the row was no longer running (swept)."""
    statement = (
        update(TrialResult)
        .where(TrialResult.id == row_id, TrialResult.state == ResultState.running)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    with db.session() as session:
        if db.engine.dialect.update_returning:
            shown = session.execute(statement.returning(*_SHOWN)).first()
            return None if shown is None else TrialResult(**shown._asdict())
        if session.execute(statement).rowcount != 1:
            return None
        return session.get(TrialResult, row_id)


# The trial-result columns of a trial's log line (_close_row).
_SHOWN = (
    TrialResult.label,
    TrialResult.val_accuracy,
    TrialResult.params_pct,
    TrialResult.epochs_run,
)


def _update_row(
    db: Database, row_id: int, *, only_running: bool = True, retry: bool = True, **values: Any
) -> bool:
    """Set columns of a trial-result row; with ``only_running`` only while it is running.
    Returns whether the row was updated. With ``retry`` through database outages."""
    conditions = [TrialResult.id == row_id]
    if only_running:
        conditions.append(TrialResult.state == ResultState.running)

    def write() -> bool:
        with db.session() as session:
            result = session.execute(
                update(TrialResult)
                .where(*conditions)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        return result.rowcount == 1

    return db.retrying(write, what="updating a trial") if retry else write()


def _fail_search(db: Database, search_id: str, error: str) -> None:
    now = utcnow()

    def write() -> None:
        with db.session() as session:
            session.execute(
                update(Search)
                .where(Search.id == search_id, Search.state.in_(_ACTIVE_SEARCH_STATES))
                .values(state=SearchState.failed, error=error, finished_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )

    db.retrying(write, what="failing a search")


# -- dry runs -------------------------------------------------------------------------------


def dry_run_figures(architecture: Architecture) -> tuple[float, dict[str, Any]]:
    """The made-up validation accuracy and overheads a dry-run worker records: fixed functions of
    the architecture's id (the same from every worker), overheads 0 % without attention. Nothing
    is built, measured or trained."""
    digest = hashlib.sha256(architecture.id.encode()).digest()
    u = [int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 0xFFFF for i in range(4)]
    attends = architecture.attention != "none"
    pct = {
        "params_pct": 0.2 + 4.8 * u[1] if attends else 0.0,
        "macs_pct": 0.1 + 1.9 * u[2] if attends else 0.0,
        "latency_pct": 1.0 + 29.0 * u[3] if attends else 0.0,
    }
    base_params, base_macs, base_latency_ms = DRY_RUN_BASELINE
    figures = {
        "params": round(base_params * (1 + pct["params_pct"] / 100)),
        "macs": round(base_macs * (1 + pct["macs_pct"] / 100)),
        "attention_ops": 0,
        "latency_ms": base_latency_ms * (1 + pct["latency_pct"] / 100),
        "train_step_ms": None,
        "peak_memory_bytes": None,
        **pct,
    }
    return 0.5 + 0.4 * u[0], figures


# -- artifacts -------------------------------------------------------------------------------


def validation_samples(
    data: DatasetTensors | StreamingData, count: int = SAMPLE_IMAGES
) -> dict[str, Any] | None:
    """The first ``count`` validation images (the test set's when there is no validation set) as
    ``images`` (uint8 NCHW), ``labels`` (int64) and the per-channel ``mean`` and ``std`` (float32,
    [0, 1] units) that training normalises with: ``(images / 255 - mean) / std``. None when
    there are no such images."""
    import torch

    if isinstance(data, StreamingData):
        files = data.val if len(data.val) else data.test
        if files is None or not len(files):
            return None
        decoded = [files[i] for i in range(min(count, len(files)))]
        images = torch.stack([image for image, _ in decoded])
        labels = torch.tensor([label for _, label in decoded], dtype=torch.int64)
    else:
        x, y = data.val_x, data.val_y
        if not len(y) and data.test_x is not None and data.test_y is not None:
            x, y = data.test_x, data.test_y
        if not len(y):
            return None
        images, labels = x[:count], y[:count]
    return {
        "images": images.to(torch.uint8).contiguous().clone(),
        "labels": labels.to(torch.int64).contiguous().clone(),
        "mean": torch.tensor(data.mean, dtype=torch.float32),
        "std": torch.tensor(data.std, dtype=torch.float32),
    }


def store_artifacts(
    store: Any,
    trial: optuna.Trial,
    architecture: Architecture,
    result: TrainResult,
    overhead: OverheadReport,
    samples: dict[str, Any] | None = None,
    db: Database | None = None,
) -> dict[str, str]:
    """Upload weights, architecture, metrics and (when given) the sample images of
    :func:`validation_samples`; returns file name -> artifact id (also set as the trial's user
    attribute ``artifacts``). With ``db`` each upload is retried through its outages."""
    from optuna.artifacts import upload_artifact
    from safetensors.torch import save_file

    def call(fn: Callable[[], Any], what: str) -> Any:
        return fn() if db is None else db.retrying(fn, what=what)

    ids: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cbam-nas-") as tmp:
        folder = Path(tmp)
        save_file(
            result.state_dict,
            str(folder / "weights.safetensors"),
            metadata={"architecture": architecture.to_json()},
        )
        (folder / "architecture.json").write_text(architecture.to_json())
        metrics = {**result.metrics(), "overhead": overhead.to_dict()}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if samples is not None:
            save_file(
                samples, str(folder / SAMPLES_FILE), metadata={"normalisation": NORMALISATION}
            )
        for name in ARTIFACT_FILES:
            if not (folder / name).exists():
                continue
            path = str(folder / name)
            ids[name] = call(
                lambda path=path: upload_artifact(
                    artifact_store=store, file_path=path, study_or_trial=trial
                ),
                f"storing {name}",
            )
    call(lambda: trial.set_user_attr(ARTIFACTS_ATTR, ids), "storing artifact ids")
    return ids


# -- progress --------------------------------------------------------------------------------


@functools.cache
def stderr_console() -> Console:
    """The one rich console on stderr, shared by the progress bar and the log handler so that
    log lines print above the bar."""
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """A rich progress bar of the current trial's epochs (a no-op when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        self._task: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=stderr_console(),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, description: str, total: int) -> None:
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(description, total=total)

    def advance(self, description: str | None = None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, description=description)


# -- the worker ------------------------------------------------------------------------------


class _Heartbeat:
    """Refreshes the row's ``heartbeat_at`` and the worker's ``last_seen`` from a thread."""

    def __init__(self, worker: Worker, claim: Claim) -> None:
        self.worker, self.claim = worker, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        db, interval = self.worker.db, self.worker.options.heartbeat_interval_s
        wait = interval
        while not self._stop.wait(wait):
            wait = interval
            try:
                _update_row(db, self.claim.row_id, retry=False, heartbeat_at=utcnow())
                self.worker.seen(self.claim, retry=False)
            except Exception as exc:  # an unavailable database must not end the trial
                if not is_transient(exc):
                    log.exception("heartbeat failed")
                    continue
                db.outage.failed("heartbeat", exc)
                # Beat again soon: the first heartbeat after an outage must come at once.
                wait = min(interval, RETRY_FIRST_DELAY_S)
                continue
            db.outage.ok()


class Worker:
    """One worker process's loop; :meth:`run` returns the exit status."""

    def __init__(self, options: WorkerOptions, settings: Settings | None = None) -> None:
        self.options = options
        self.settings = settings or get_settings()
        self.device = str(check_device(options.device))
        self.name = options.name or f"{socket.gethostname()}-{os.getpid()}"
        self.db = open_database(options.database_url or self.settings.database_url, role="worker")
        self.db.retry_s = self.settings.db_retry_s
        self.stopping = threading.Event()
        self._store: Any = None
        self.trials_run = 0
        # study name -> the Study this worker asks and tells: Optuna's cached storage inside it
        # keeps the finished trials, so that an ask reads only the new and unfinished ones.
        self._studies: dict[str, optuna.Study] = {}
        # Studies whose queue of enqueued trials (the references) this worker found empty: they
        # are enqueued when the study is created, before its search can be claimed, so an ask
        # need not look there again (see _ask).
        self._drained: set[str] = set()
        # The worker's liveness row (its id, host and device), written with each claim.
        self._identity = {"id": self.name, "host": socket.gethostname(), "device": self.device}
        self._swept_at: float | None = None

    # -- bookkeeping --

    def seen(self, claim: Claim | None = None, retry: bool = True) -> None:
        """Record that this worker is alive (and what it runs); with ``retry`` through database
        outages."""

        def write() -> None:
            with self.db.session() as session:
                session.execute(_seen_statement(self.db, **_seen_values(self._identity, claim)))

        self.db.retrying(write, what="recording the worker") if retry else write()

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping at the next epoch boundary", signal.Signals(signum).name)
        self.stopping.set()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _search_finished(self) -> bool:
        def read() -> bool:
            with self.db.session() as session:
                search = session.get(Search, self.options.search_id)
                return search is None or search.state in FINISHED_SEARCH_STATES

        return self.db.retrying(read, what="reading the search")

    def _sweep(self) -> None:
        """:func:`sweep_lost`, at most once per :func:`sweep_interval_s` (lost trials wait a
        grace period anyway), so that back-to-back trials do not each pay for it."""
        now = time.monotonic()
        interval = sweep_interval_s(self.options.grace_period_s)
        if self._swept_at is not None and now - self._swept_at < interval:
            return
        sweep_lost(self.db, self.options.grace_period_s)
        self._swept_at = now

    # -- the loop --

    def run(self) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.db.migrate()
        # Optuna's storage checks its schema when created: here, not in the first claimed trial.
        self.db.optuna_storage()
        if self.options.search_id is not None:
            with self.db.session() as session:
                if session.get(Search, self.options.search_id) is None:
                    raise InvalidValue("search", self.options.search_id, "the id of a search")
        log.info(
            "worker %s on %s started%s",
            self.name,
            self.device,
            " (dry run: made-up metrics, nothing trained)" if self.options.dry_run else "",
        )
        last_search: str | None = None  # the search of the last trial, if no claim came since
        with self._signals(), _Progress(self.options.progress) as progress:
            while not self.stopping.is_set():
                if (
                    self.options.max_trials is not None
                    and self.trials_run >= self.options.max_trials
                ):
                    break
                try:
                    self._sweep()
                    claim = claim_trial(
                        self.db,
                        self.name,
                        self.device,
                        self.options.search_id,
                        seen=self._identity,
                    )
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    # Claims are not retried blindly (a claim is not idempotent): look again.
                    self.db.outage.failed("looking for work", exc)
                    self.stopping.wait(self.options.poll_interval_s)
                    continue
                self.db.outage.ok()
                last_search = None
                if claim is None:
                    if self.options.search_id is not None and self._search_finished():
                        break
                    if self.options.exit_when_idle:
                        break
                    self.stopping.wait(self.options.poll_interval_s)
                    continue
                try:
                    self.run_trial(claim, progress)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.error(
                        "%s: the database stayed unavailable for %g s; the worker exits (the "
                        "trial is re-run once its heartbeat is older than the grace period)",
                        claim.label,
                        self.settings.db_retry_s,
                    )
                    self.db.close()
                    return 1
                self.trials_run += 1
                # The next claim completes the search if this was its last trial (claim_trial);
                # a worker that ends here does it now.
                last_search = claim.search_id
        if last_search is not None:
            maybe_complete(self.db, last_search)
        self.seen()
        log.info("worker %s stopped after %d trials", self.name, self.trials_run)
        self.db.close()
        return 0

    def run_trial(self, claim: Claim, progress: _Progress | None = None) -> ResultState | None:
        """Run one claimed attempt to its end; returns the row's final state (None if the row
        was taken from this worker)."""
        progress = progress or _Progress(False)
        with _Heartbeat(self, claim):
            trial: optuna.Trial | None = None
            try:
                trial = self._trial(claim)
                return self._evaluate(claim, trial, progress)
            except SearchFailed as exc:
                log.error("%s: search failed: %s", claim.label, exc)
                _fail_search(self.db, claim.search_id, str(exc))
                return self._end(claim, trial, ResultState.failed, str(exc))
            except TrialFailed as exc:
                log.warning("%s failed: %s", claim.label, exc.reason)
                return self._end(claim, trial, ResultState.failed, exc.reason)
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database stayed away past db_retry_s: the worker exits (run)
                log.exception("%s failed", claim.label)
                return self._end(claim, trial, ResultState.failed, f"{type(exc).__name__}: {exc}")

    def _study(self, claim: Claim) -> optuna.Study:
        """The claim's study, loaded once per search, with a sampler seeded for this attempt
        (samplers keep no state between trials that the study's storage does not hold)."""
        seed_offset = claim.number + claim.spec.budget.trials * claim.attempt
        study = self._studies.get(claim.study_name)
        if study is None:
            study = load_study(self.db, claim.study_name, claim.spec, seed_offset=seed_offset)
            self._studies[claim.study_name] = study
        else:
            study.sampler = make_sampler(claim.spec, seed_offset)
        return study

    def _trial(self, claim: Claim) -> optuna.Trial:
        study = self.db.retrying(lambda: self._study(claim), what="loading the study")
        if claim.retry_of is not None:
            previous = self.db.retrying(
                lambda: frozen_trial(study, claim.retry_of), what="reading a trial"
            )
            return self.db.retrying(lambda: retry_trial(study, previous), what="asking the study")
        queue = claim.study_name not in self._drained
        return _ask(self.db, study, queue=queue, drained=self._drained)

    def _data(self, spec: SearchSpec) -> DatasetTensors | StreamingData:
        try:
            return load_dataset(
                spec.dataset.name,
                spec.dataset.options,
                self.settings.data_dir,
                spec.dataset.val_fraction,
                spec.seed,
            )
        except (InvalidValue, DatasetNotFound) as exc:
            raise SearchFailed(str(exc)) from exc

    def _evaluate(
        self, claim: Claim, trial: optuna.Trial, progress: _Progress
    ) -> ResultState | None:
        spec = claim.spec
        architecture, reference = self.db.retrying(
            lambda: architecture_for(trial, spec), what="sampling an architecture"
        )
        _update_row(
            self.db,
            claim.row_id,
            architecture=architecture.to_dict(),
            arch_id=architecture.id,
            label=architecture.describe(),
            reference=reference,
            optuna_number=trial.number,
        )
        if self.options.dry_run:
            return self._dry_run(claim, trial, architecture)
        data = self._data(spec)
        overhead = measure(
            architecture,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            input_size=data.image_size,
            device=self.device,
            batch_size=self.options.latency_batch,
            repeats=self.options.latency_repeats,
            warmup=min(3, self.options.latency_repeats),
        )
        figures = {k: getattr(overhead, k) for k in OVERHEAD_FIELDS}
        _update_row(self.db, claim.row_id, **figures)
        constraint = constraint_value(spec, figures)
        if constraint is not None:
            self.db.retrying(lambda: set_constraint(trial, constraint), what="telling a constraint")
            if constraint > 0:
                log.info(
                    "%s %s: over the overhead budget by %.2f points, not trained",
                    claim.label,
                    architecture.describe(),
                    constraint,
                )
                return self._end(claim, trial, ResultState.over_budget, None, TrialState.PRUNED)

        progress.start(f"{claim.label} {architecture.describe()}", spec.training.epochs)
        on_epoch = self._on_epoch(claim, trial, reference, progress)
        result = train(
            architecture,
            data,
            spec.training,
            seed=spec.seed,
            device=self.device,
            on_epoch=on_epoch,
            threads=self.options.threads,
        )
        return self._finish(claim, trial, architecture, overhead, result, data)

    def _dry_run(
        self, claim: Claim, trial: optuna.Trial, architecture: Architecture
    ) -> ResultState | None:
        """End a dry-run trial: made-up figures, written and told as a trained trial's are,
        after ``dry_run_seconds`` in place of training (a signal meanwhile hands the trial back,
        as at an epoch boundary)."""
        seconds = self.options.dry_run_seconds
        if seconds > 0 and self.stopping.wait(seconds):
            return self._end(claim, trial, ResultState.requeued, f"{STOPPED_REASON} (signal)")
        accuracy, figures = dry_run_figures(architecture)
        constraint = constraint_value(claim.spec, figures)
        if constraint is not None:
            self.db.retrying(lambda: set_constraint(trial, constraint), what="telling a constraint")
            if constraint > 0:
                return self._end(
                    claim, trial, ResultState.over_budget, None, TrialState.PRUNED, **figures
                )
        metrics = {"val_accuracy": accuracy, "final_val_accuracy": accuracy}
        values = objective_values(claim.spec, accuracy, figures)
        return self._end(
            claim,
            trial,
            ResultState.completed,
            None,
            values=values,
            epochs_run=0,
            wall_time_s=seconds,
            **figures,
            **metrics,
        )

    def _on_epoch(
        self, claim: Claim, trial: optuna.Trial, reference: str | None, progress: _Progress
    ) -> Callable[[EpochReport], None]:
        spec = claim.spec
        policy = early_stopping_policy(spec)
        curve: list[dict[str, Any]] = []

        def search_state() -> SearchState | None:
            with self.db.session() as session:
                return session.scalar(select(Search.state).where(Search.id == claim.search_id))

        def on_epoch(report: EpochReport) -> None:
            curve.append(report.to_dict())
            best = max(point["val_accuracy"] for point in curve)
            alive = _update_row(
                self.db,
                claim.row_id,
                learning_curve=list(curve),
                epochs_run=report.epoch,
                val_accuracy=best,
                final_val_accuracy=report.val_accuracy,
                heartbeat_at=utcnow(),
            )
            log.info(
                "%s epoch %d/%d: val acc %.4f, train loss %.4f, %.1f s, %.0f img/s",
                claim.label,
                report.epoch,
                spec.training.epochs,
                report.val_accuracy,
                report.train_loss,
                report.seconds,
                report.images_per_s,
            )
            progress.advance()
            if not alive:
                raise StopTraining("lost")
            if report.epoch >= spec.training.epochs:
                return  # the trial is complete: keep its result whatever happens now
            if self.stopping.is_set():
                raise StopTraining("shutdown")
            if self.db.retrying(search_state, what="reading the search") != SearchState.running:
                raise StopTraining("cancelled")
            context = EpochContext(
                self.db, claim.search_id, claim.row_id, trial, report.epoch, report.val_accuracy
            )
            # References always run to the end (they are the baselines), but are reported to
            # the policy so that Optuna's pruners see them.
            stop = self.db.retrying(lambda: policy.should_stop(context), what="early stopping")
            if stop and reference is None:
                raise StopTraining("pruned")

        return on_epoch

    def _finish(
        self,
        claim: Claim,
        trial: optuna.Trial,
        architecture: Architecture,
        overhead: OverheadReport,
        result: TrainResult,
        data: DatasetTensors | StreamingData | None = None,
    ) -> ResultState | None:
        common = {
            "val_accuracy": result.best_val_accuracy,
            "final_val_accuracy": result.final_val_accuracy,
            "test_accuracy": result.test_accuracy,
            "epochs_run": result.epochs_run,
            "wall_time_s": result.wall_time_s,
            "images_per_s": result.images_per_s,
        }
        if result.stopped == "lost":
            log.warning("%s was taken from this worker (heartbeat too old)", claim.label)
            tell_failed(self.db, claim.study_name, trial.number)
            return None
        if result.stopped == "shutdown":
            return self._end(claim, trial, ResultState.requeued, f"{STOPPED_REASON} (signal)")
        if result.stopped == "cancelled":
            return self._end(claim, trial, ResultState.failed, CANCELLED_REASON)
        if result.stopped == "pruned":
            return self._end(claim, trial, ResultState.pruned, None, TrialState.PRUNED, **common)
        if self._store is None:
            self._store = artifact_store(self.settings, self.options.artifacts_dir)
        samples = None
        if data is not None:
            try:
                samples = validation_samples(data)
            except Exception:  # the pictures are optional: never lose a trained trial to them
                log.warning("%s: no sample images stored", claim.label, exc_info=True)
        artifacts = store_artifacts(
            self._store, trial, architecture, result, overhead, samples, db=self.db
        )
        values = objective_values(claim.spec, result.best_val_accuracy, overhead.to_dict())
        return self._end(
            claim, trial, ResultState.completed, None, values=values, artifacts=artifacts, **common
        )

    def _end(
        self,
        claim: Claim,
        trial: optuna.Trial | None,
        state: ResultState,
        reason: str | None,
        optuna_state: TrialState = TrialState.FAIL,
        values: list[float] | None = None,
        **row_values: Any,
    ) -> ResultState | None:
        """Tell the study, then close the row (if it is still ours) with its final state and
        ``row_values`` (the trial's figures) in one update; log the trial's line."""
        if trial is not None:
            if values is not None:
                tell = functools.partial(tell_trial, trial.study, trial, values)
            else:
                tell = functools.partial(tell_trial, trial.study, trial, state=optuna_state)
            self.db.retrying(tell, what="telling the study")
        finished_at = utcnow()
        row = self.db.retrying(
            lambda: _close_row(
                self.db,
                claim.row_id,
                state=state,
                failure_reason=reason,
                finished_at=finished_at,
                **row_values,
            ),
            what="updating a trial",
        )
        if row is None:
            log.warning("%s was taken from this worker before it ended", claim.label)
            return None
        params_pct = "-" if row.params_pct is None else f"{row.params_pct:+.2f}%"
        accuracy = "-" if row.val_accuracy is None else f"{row.val_accuracy:.4f}"
        log.info(
            "%s %s: %s, val acc %s, params %s, %d epochs%s",
            claim.label,
            state.value,
            row.label or "?",
            accuracy,
            params_pct,
            row.epochs_run,
            f" ({reason})" if reason else "",
        )
        return state


def _ask(
    db: Database, study: optuna.Study, queue: bool = True, drained: set[str] | None = None
) -> optuna.Trial:
    """``study.ask()`` in two steps, each retried through database outages: take an enqueued
    trial or create one, then build the Trial (the sampler's reads), so that an outage after the
    first does not leave a second running trial behind when the whole ask is retried.

    Without ``queue`` no enqueued trial is looked for (the study's queue was found empty
    before, and trials are only enqueued when a study is created): that saves reading the
    study's new trials, which only the queue needs (samplers read them when they need them).
    ``drained`` gets the study's name when its queue is found empty."""
    pop = getattr(study, "_pop_waiting_trial_id", None)
    if pop is None:  # an Optuna without it: retry the whole ask
        return db.retrying(study.ask, what="asking the study")

    created = False

    def take() -> int:
        nonlocal created
        trial_id = pop() if queue else None
        if trial_id is None:
            if queue and drained is not None:
                drained.add(study.study_name)
            trial_id = study._storage.create_new_trial(study._study_id)
            created = True
        return trial_id

    if queue:
        with sqlite_ask_lock(db):
            trial_id = db.retrying(take, what="asking the study")
    else:
        trial_id = db.retrying(take, what="asking the study")
    with contextlib.suppress(AttributeError):
        study._thread_local.cached_all_trials = None  # as ask does: read the trials anew
    if created:  # a new trial, not one from the queue: built without reading it back
        return db.retrying(lambda: created_trial(study, trial_id), what="asking the study")
    return db.retrying(lambda: optuna.Trial(study, trial_id), what="asking the study")


def run_worker(options: WorkerOptions) -> int:
    """Run a worker until its work is done (or it is stopped); returns the exit status."""
    return Worker(options).run()
