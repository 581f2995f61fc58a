"""A search's life: creating it (row, Optuna study, enqueued references), cancelling, deleting.

Shared by the command line (``cbam-nas run``) and the REST API; no HTTP here.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import optuna
from sqlalchemy import func, select, update

from search.errors import Conflict, NotFound
from search.store.artifacts import remove_artifacts
from search.store.models import ResultState, Search, SearchState, TrialResult, utcnow
from search.study.studies import create_study

if TYPE_CHECKING:
    from search.spec import SearchSpec
    from search.store.engine import Database


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
    create_study(db, spec, row.study_name)
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


ACTIVE_STATES = (SearchState.queued, SearchState.running)


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
