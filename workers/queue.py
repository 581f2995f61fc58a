"""The work queue in the database: claiming trials, retries, the sweep of lost trials, and the
trial-result rows' updates.

Claims. A new slot of a search's budget is claimed by one conditional update,
``claimed = claimed + 1 WHERE claimed < budget_trials``, in the transaction that inserts the
slot's trial-result row, so that the budget is never exceeded however many workers race. A slot
whose attempt was handed back (``requeued``: its worker died or was stopped) or failed is run
again as attempt + 1 without a new slot; inserting that row is the claim, made atomic by the
unique (search, number, attempt) constraint. A requeued attempt runs again with the same Optuna
parameters (:func:`search.study.optuna_fast.retry_trial`), a failed one (e.g. a diverging loss)
draws anew; retries are bounded by ``budget.max_retries`` (hand-backs by a signal do not count;
:func:`search.store.searches.pending_retries`). Among the searches with work, a worker takes the
one with the fewest trials in flight relative to its budget.

Lost trials. Any worker looking for work sweeps (at most every quarter of its grace period, and
at most 5 s apart) rows whose heartbeat is older than its ``grace_period_s``: the attempt is
requeued ("worker lost"), its Optuna trial failed, and the slot runs again. Missed heartbeats
mean nothing while the database was away, so a worker sweeps only once the database has
answered for a whole grace period (:meth:`search.store.engine.Database.available_for`).

A search is completed (:func:`search.store.searches.maybe_complete`) by the next claim of any
worker that reads it finished (the worker that ran its last trial, at the latest), or by a
worker that stops.

Per trial, coordination costs a claim (one transaction: the searches read, the slot claimed,
the trial-result row inserted, the worker's row written), Optuna's ask (the references are
taken from the study's queue until a worker finds it empty; then new trials only), the sampled
parameters written in one transaction (:func:`search.study.optuna_fast.params_written_at_once`),
the architecture written to the row, Optuna's tell, and one update closing the row with its
figures.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import TrialState
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from search.spec import SearchSpec
from search.store.attempts import LOST_REASON, pending_retries
from search.store.confirmation import schedule_round
from search.store.engine import Database, is_transient
from search.store.models import (
    Phase,
    ResultState,
    Search,
    SearchState,
    TrialResult,
    WorkerSeen,
    utcnow,
)
from search.store.searches import ACTIVE_STATES, maybe_complete

log = logging.getLogger("cbam_nas.worker")

_RETRY_STATES = (ResultState.requeued, ResultState.failed)
SWEEP_INTERVAL_S = 5.0
"""The longest time between two sweeps for lost trials of a worker looking for work."""


@dataclass
class Claim:
    """One attempt this worker holds. ``retry_of`` is the Optuna number whose parameters the
    attempt re-runs (None: ask the study). A confirmation run (``phase`` confirm) carries its
    architecture, reference and seed instead: it never asks the study."""

    search_id: str
    study_name: str
    spec: SearchSpec
    row_id: int
    number: int
    attempt: int
    retry_of: int | None = None
    phase: Phase = Phase.explore
    seed: int | None = None
    architecture: dict[str, Any] | None = None
    reference: str | None = None
    label: str = field(init=False, default="")

    def __post_init__(self) -> None:
        kind = "confirmation run" if self.phase == Phase.confirm else "trial"
        self.label = f"search {self.search_id[:8]} {kind} {self.number}.{self.attempt}"

    @classmethod
    def of_confirmation(
        cls, search: Search, spec: SearchSpec, row: TrialResult, row_id: int
    ) -> Claim:
        return cls(
            search.id,
            search.study_name,
            spec,
            row_id,
            row.number,
            row.attempt,
            phase=Phase.confirm,
            seed=row.seed,
            architecture=row.architecture,
            reference=row.reference.value if row.reference else None,
        )


def sqlite_ask_lock(db: Database) -> contextlib.AbstractContextManager[Any]:
    """Serialise taking trials from a study's queue between the workers of one SQLite file.

    Optuna pops an enqueued trial by reading it WAITING, then marking it RUNNING under a
    ``SELECT ... FOR UPDATE`` that SQLite ignores, and Python's sqlite3 opens the transaction
    only at the write: two workers asking at once could both take the same enqueued trial (and
    tell it twice). PostgreSQL's row lock prevents that; on SQLite a lock file beside the
    database does (``filelock``: flock on POSIX, the OS lock on Windows)."""
    path = db.sqlite_path
    if path is None:
        return contextlib.nullcontext()
    return FileLock(path.with_name(path.name + ".ask.lock"))


def _new_row(
    search: Search, spec: SearchSpec, number: int, attempt: int, worker: str, device: str
) -> TrialResult:
    """An exploration attempt's row: it trains on the spec's seed and schedule."""
    now = utcnow()
    return TrialResult(
        search_id=search.id,
        number=number,
        attempt=attempt,
        architecture={},
        arch_id="",
        state=ResultState.running,
        phase=Phase.explore,
        seed=spec.seed,
        fidelity_epochs=spec.training.epochs,
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
                row = _new_row(search, spec, previous.number, previous.attempt + 1, worker, device)
                confirming = previous.phase == Phase.confirm
                if previous.state == ResultState.requeued or confirming:
                    row.architecture, row.arch_id = previous.architecture, previous.arch_id
                    row.label, row.reference = previous.label, previous.reference
                if confirming:  # the same architecture on the same seed, whatever happened
                    row.phase, row.seed = previous.phase, previous.seed
                    row.fidelity_epochs = previous.fidelity_epochs
                session.add(row)
                session.flush()
                row_id = row.id
        except IntegrityError:
            continue  # another worker took this retry
        if confirming:
            return Claim.of_confirmation(search, spec, row, row_id)
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
            Search.state.in_(ACTIVE_STATES),
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
    row = _new_row(search, spec, number, 0, worker, device)
    session.add(row)
    session.flush()
    return Claim(search.id, search.study_name, spec, row.id, number, 0)


def _claim_pending(
    db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    """Take one of the search's scheduled confirmation runs (the lowest-numbered first): a
    conditional update from pending to running, so that one worker gets each."""
    with db.session() as session:
        candidates = session.scalars(
            select(TrialResult)
            .where(TrialResult.search_id == search.id, TrialResult.state == ResultState.pending)
            .order_by(TrialResult.number)
            .limit(8)
        ).all()
    for row in candidates:
        now = utcnow()
        with db.session() as session:
            taken = session.execute(
                update(TrialResult)
                .where(TrialResult.id == row.id, TrialResult.state == ResultState.pending)
                .values(
                    state=ResultState.running,
                    worker=worker,
                    device=device,
                    heartbeat_at=now,
                    created_at=now,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
        if taken == 1:
            return Claim.of_confirmation(search, spec, row, row.id)
    return None


def _claim_confirmation(
    db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    """A scheduled confirmation run of the search; when there is none and the race needs its
    next round, that round is scheduled first (search.store.confirmation)."""
    if not spec.confirm.enabled or search.claimed < search.budget_trials:
        return None
    claim = _claim_pending(db, search, spec, worker, device)
    if claim is None and schedule_round(db, search.id):
        claim = _claim_pending(db, search, spec, worker, device)
    return claim


def seen_statement(db: Database, **values: Any) -> Any:
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


def seen_values(seen: dict[str, Any], claim: Claim | None) -> dict[str, Any]:
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
        query = select(Search).where(Search.state.in_(ACTIVE_STATES))
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
            and (
                search.claimed >= search.budget_trials
                or search.past_deadline(spec.budget.wall_clock_s)
            )
        ]
        claim = None
        for search, spec in ordered:
            if search.id in may_retry or search.past_deadline(spec.budget.wall_clock_s):
                break  # a retry or a completion to look at first: the loop below
            if search.claimed >= search.budget_trials and spec.confirm.enabled:
                break  # its confirmation: the loop below
            if search.claimed < search.budget_trials:
                tried = search.id
                claim = _claim_slot_in(session, db, search, spec, worker, device)
                break
        if seen is not None:
            session.execute(seen_statement(db, **seen_values(seen, claim)))
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
        if search.past_deadline(spec.budget.wall_clock_s):
            if search.id not in done:
                maybe_complete(db, search.id)
            continue
        if search.id in may_retry:
            claim = _claim_retry(db, search, spec, worker, device)
        if claim is None and search.id != tried:
            claim = _claim_slot(db, search, spec, worker, device)
        if claim is None:
            claim = _claim_confirmation(db, search, spec, worker, device)
        if claim is not None:
            if seen is not None:
                with db.session() as session:
                    session.execute(seen_statement(db, **seen_values(seen, claim)))
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


def close_row(db: Database, row_id: int, **values: Any) -> TrialResult | None:
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


def update_row(
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
