"""A search's life, every change of its state in one place: creating it (row, Optuna study,
enqueued references), cancelling, deleting, completing it when nothing is left to run, and
failing it when it cannot run at all; and its Optuna study, loaded for a search row.

Shared by the command line (``cbam-nas run``), the REST API and the workers; no HTTP here.
A search's budget counts slots (``Search.claimed`` of ``budget_trials``); an attempt that was
handed back (``requeued``) or failed runs again while it has retries left
(:func:`pending_retries`), and a search is complete once every slot is claimed (or its
wall-clock budget has passed), nothing runs and no retry is pending (:func:`maybe_complete`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import optuna
from sqlalchemy import delete, exists, func, select, update

from search.errors import Conflict, NotFound
from search.spec import SearchSpec
from search.store.artifacts import remove_artifacts
from search.store.attempts import pending_retries
from search.store.confirmation import confirmation_finished
from search.store.models import ResultState, Search, SearchState, TrialResult, utcnow
from search.study.studies import create_study, load_study

if TYPE_CHECKING:
    from search.store.engine import Database

log = logging.getLogger("cbam_nas.searches")

ACTIVE_STATES = (SearchState.queued, SearchState.running)
FINISHED_STATES = (SearchState.completed, SearchState.cancelled, SearchState.failed)


def create_search(
    db: Database,
    spec: SearchSpec,
    *,
    name: str | None = None,
    idempotency_key: str | None = None,
    max_trials: int | None = None,
) -> Search:
    """Validate ``spec`` (against ``max_trials``), create the study (references enqueued) and
    store the search row in state ``queued``, where workers pick it up.

    With an ``idempotency_key`` that an earlier call used, that call's search is returned and
    nothing is created. The study is created first: if storing the row fails, it is deleted.
    """
    spec.validate(max_trials)
    if idempotency_key is not None:
        existing = find_by_idempotency_key(db, idempotency_key)
        if existing is not None:
            return existing
    row = Search(
        name=name if name is not None else spec.name,
        spec=spec.to_dict(),
        state=SearchState.queued,
        budget_trials=spec.budget.trials,
        claimed=0,
        idempotency_key=idempotency_key,
    )
    create_study(db.optuna_storage(), spec, row.study_name)
    try:
        with db.session() as session:
            session.add(row)
    except Exception:
        optuna.delete_study(study_name=row.study_name, storage=db.optuna_storage())
        if idempotency_key is not None:
            existing = find_by_idempotency_key(db, idempotency_key)
            if existing is not None:  # a concurrent call with the same key won
                return existing
        raise
    return row


def find_by_idempotency_key(db: Database, key: str) -> Search | None:
    with db.session() as session:
        return session.scalars(select(Search).where(Search.idempotency_key == key)).one_or_none()


def search_study(
    db: Database, search: Search | str, spec: SearchSpec | None = None, *, seed_offset: int = 0
) -> optuna.Study:
    """The Optuna study of ``search`` (a row, or its study name), with the sampler and pruner of
    its spec (read from the row when not given); see :func:`search.study.studies.load_study`."""
    if isinstance(search, str):
        with db.session() as session:
            search = session.scalars(select(Search).where(Search.study_name == search)).one()
    spec = spec or SearchSpec.from_dict(search.spec)
    return load_study(db.optuna_storage(), search.study_name, spec, seed_offset=seed_offset)


def cancel_search(db: Database, search_id: str) -> Search:
    """Move a queued or running search to ``cancelled``; its running trials stop at their next
    epoch boundary. :class:`Conflict` if the search has already finished."""
    now = utcnow()
    with db.session() as session:
        changed = session.execute(
            update(Search)
            .where(Search.id == search_id, Search.state.in_(ACTIVE_STATES))
            .values(state=SearchState.cancelled, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        search = session.get(Search, search_id)
        if search is None:
            raise NotFound(f"search {search_id}")
    if not changed:
        raise Conflict(
            f"search {search_id} is {search.state.value}; only a queued or running search "
            "can be cancelled"
        )
    return search


def delete_search(db: Database, search_id: str, store: Any | None = None) -> None:
    """Delete a finished search: its Optuna study, its rows and (with ``store``) its stored
    artifacts. :class:`Conflict` while it is queued or running, or a trial still runs."""
    with db.session() as session:
        search = session.get(Search, search_id, with_for_update=not db.is_sqlite)
        if search is None:
            raise NotFound(f"search {search_id}")
        if search.state in ACTIVE_STATES:
            raise Conflict(
                f"search {search_id} is {search.state.value}; cancel it before deleting it"
            )
        running = session.scalar(
            select(func.count()).where(
                TrialResult.search_id == search_id, TrialResult.state == ResultState.running
            )
        )
        if running:
            raise Conflict(
                f"{running} trial(s) of search {search_id} are still stopping; "
                "delete it when they have ended"
            )
        artifact_ids = [
            artifact_id
            for artifacts in session.scalars(
                select(TrialResult.artifacts).where(
                    TrialResult.search_id == search_id, TrialResult.artifacts.is_not(None)
                )
            )
            for artifact_id in (artifacts or {}).values()
        ]
        study_name = search.study_name
        session.delete(search)
    with contextlib.suppress(KeyError):  # the study may be gone already
        optuna.delete_study(study_name=study_name, storage=db.optuna_storage())
    if store is not None:
        remove_artifacts(store, artifact_ids)


# -- completion and failure ----------------------------------------------------------------


def maybe_complete(db: Database, search_id: str) -> bool:
    """Mark the search completed if nothing is left to run (its exploration and, once that is
    finished, its confirmation race: search.store.confirmation); True if this call did."""
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
        if search.past_deadline(spec.budget.wall_clock_s):
            # Runs scheduled but not started are dropped: the budget has run out.
            session.execute(
                delete(TrialResult).where(
                    TrialResult.search_id == search_id, TrialResult.state == ResultState.pending
                )
            )
        else:
            retry = pending_retries(search_id, spec.budget.max_retries).exists()
            scheduled = exists().where(
                TrialResult.search_id == search_id, TrialResult.state == ResultState.pending
            )
            conditions += [Search.claimed >= Search.budget_trials, ~retry, ~scheduled]
            if not confirmation_finished(session, search, spec):
                return False
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


def fail_search(db: Database, search_id: str, error: str) -> None:
    now = utcnow()

    def write() -> None:
        with db.session() as session:
            session.execute(
                update(Search)
                .where(Search.id == search_id, Search.state.in_(ACTIVE_STATES))
                .values(state=SearchState.failed, error=error, finished_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )

    db.retrying(write, what="failing a search")
