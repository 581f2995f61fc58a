"""``/searches``: submit, list, look at, cancel and delete searches."""

from __future__ import annotations

import json
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from search.errors import Conflict
from search.results.agreement import rank_agreement, rung_agreement
from search.results.queries import (
    get_search,
    list_searches,
    progress,
    progress_of,
    reference_convergence,
)
from search.spec import EXAMPLE, SearchSpec
from search.store.models import ApiToken, SearchState
from search.store.searches import (
    cancel_search,
    create_search,
    delete_search,
    find_by_idempotency_key,
)
from service.api.deps import DB, Admin, AppSettings, Offset, Reader, Store, Writer, write_access
from service.api.routes.attention import attention_dir
from service.api.routes.files import export_dir
from service.api.schemas import Page, SearchOut

router = APIRouter(prefix="/searches", tags=["searches"])


async def spec_body(
    request: Request, _caller: Annotated[ApiToken, Depends(write_access)]
) -> dict[str, Any]:
    """The JSON body as a mapping, parsed only once the caller is known: FastAPI parses a
    declared body before any dependency runs, which would answer strangers with validation
    errors instead of 401."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {exc}"}]
        ) from None
    if not isinstance(data, dict):
        raise RequestValidationError(
            [{"type": "dict_type", "loc": ("body",), "msg": "a SearchSpec must be a JSON object"}]
        )
    return data


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Writer],
    responses={200: {"description": "The search an earlier request with this key created."}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/SearchSpec"},
                    "example": EXAMPLE,
                }
            },
        }
    },
)
def submit(
    db: DB,
    settings: AppSettings,
    response: Response,
    spec: Annotated[dict[str, Any], Depends(spec_body)],
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Repeat a submit safely: the same key, one search."),
    ] = None,
) -> SearchOut:
    """Create a search from a SearchSpec; workers start on it at once."""
    parsed = SearchSpec.from_dict(spec).validate(
        settings.max_trials_per_search, settings.allowed_data_roots, settings.allow_downloads
    )
    if idempotency_key is not None:
        existing = find_by_idempotency_key(db, idempotency_key)
        if existing is not None:
            _check_same_spec(existing.spec, parsed, idempotency_key)
            response.status_code = status.HTTP_200_OK
            return SearchOut.of(existing, progress(db, existing))
    search = create_search(
        db, parsed, idempotency_key=idempotency_key, max_trials=settings.max_trials_per_search
    )
    return SearchOut.of(search, progress(db, search))


def _check_same_spec(stored: dict[str, Any], spec: SearchSpec, key: str) -> None:
    if stored != spec.to_dict():
        raise Conflict(f"Idempotency-Key {key!r} was used for a different search spec")


@router.get("", dependencies=[Reader])
def list_all(
    db: DB,
    state: SearchState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[SearchOut]:
    """Searches, newest first, with their progress."""
    total, rows = list_searches(db, state=state, limit=limit, offset=offset)
    progresses = progress_of(db, rows)
    items = [SearchOut.of(row, progresses[row.id]) for row in rows]
    return Page[SearchOut](total=total, offset=offset, limit=limit, items=items)


@router.get("/{search_id}", dependencies=[Reader])
def show(db: DB, search_id: str) -> SearchOut:
    """A search: state, progress (the exploration's trials by state of the budget, the
    confirmation's runs, the validation split and its noise floor), ETA, the best trial so
    far, how well the early-stopping rungs ranked the trials that ran to the end, and once
    confirmed, how well the exploration ranked the confirmed architectures."""
    search = get_search(db, search_id)
    answered = progress(db, search)
    converged = reference_convergence(db, search_id) if answered.best is not None else None
    return SearchOut.of(
        search,
        answered,
        rank_agreement(db, search_id),
        converged,
        rung_agreement(db, search_id),
    )


@router.post("/{search_id}/cancel", dependencies=[Writer])
def cancel(db: DB, search_id: str) -> SearchOut:
    """Cancel a queued or running search (409 once it has finished). Running trials stop at
    their next epoch boundary."""
    search = cancel_search(db, search_id)
    return SearchOut.of(search, progress(db, search))


@router.delete("/{search_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Admin])
def delete(db: DB, settings: AppSettings, store: Store, search_id: str) -> Response:
    """Delete a finished search: its study, trial rows and stored files (409 while it runs).
    Admin tokens only: what it removes cannot be made again."""
    delete_search(db, search_id, store)
    for cache in (export_dir(settings, search_id), attention_dir(settings, search_id)):
        shutil.rmtree(cache, ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
