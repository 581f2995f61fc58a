"""Analysis answers sent as JSON bytes encoded once per search version, with an ETag.

The answers are plain dicts of thousands of points: FastAPI's generic encoder walks them on
every request (30-60 ms at 10,000 trials), ``json.dumps`` once per change of the search takes a
few. The ETag is the search's version (``search.results.cache.version``) with the question, so a
dashboard polling an unchanged search gets ``304 Not Modified`` and redraws nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable
from typing import Any

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder

from search.results.cache import CACHE, version
from search.store.engine import Database

# Browsers keep the answer and ask again each time (If-None-Match).
_HEADERS = {"Cache-Control": "private, no-cache", "Vary": "Authorization, Cookie"}


def _encode(answer: Any) -> bytes:
    """The same JSON as FastAPI's response (no NaN), for plain data without its generic walk."""
    return json.dumps(
        answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=jsonable_encoder
    ).encode()


def json_answer(
    request: Request,
    db: Database,
    search_id: str,
    compute: Callable[..., Any],
    *args: Hashable,
) -> Response:
    """``compute(db, search_id, *args)`` as JSON, encoded once per version of the search
    (shared, LRU cached)."""
    current = version(db, search_id)
    question = (compute.__module__, compute.__qualname__, *args)
    tag = hashlib.sha256(repr((search_id, current, question)).encode()).hexdigest()[:20]
    etag = f'"{tag}"'
    headers = {**_HEADERS, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = CACHE.get_or_compute(
        (repr(db), search_id, current, ("json", *question)),
        lambda: _encode(compute(db, search_id, *args)),
    )
    return Response(body, media_type="application/json", headers=headers)
