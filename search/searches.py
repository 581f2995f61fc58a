"""Creating a search: the row, its Optuna study and the enqueued references, in one call.

Shared by the command line (``cbam-nas run``) and the REST API; no HTTP here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna
from sqlalchemy import select

from search.records import Search, SearchState
from search.study import create_study

if TYPE_CHECKING:
    from search.db import Database
    from search.spec import SearchSpec


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
