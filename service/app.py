"""The FastAPI application: the API under ``/api/v1``, operations endpoints, error mapping.

``create_app`` builds one app around one opened database; ``cbam-nas serve`` runs it with
uvicorn. Domain errors map onto HTTP here and only here: :class:`InvalidValue` -> 422 (with the
field's path in the body and the allowed values), :class:`NotFound` -> 404, :class:`Conflict`
-> 409; bodies over ``max_request_bytes`` -> 413, JSON nested deeper than
:data:`MAX_JSON_DEPTH` -> 422.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from search.errors import Conflict, InvalidValue, NotFound
from search.settings import Settings, get_settings
from search.spec import SearchSpec
from search.store.artifacts import artifact_store
from search.store.engine import Database, open_database
from service.api.routes import analysis, attention, files, me, meta, ops, searches, trials
from service.dashboard import routes as dashboard

API_PREFIX = "/api/v1"
_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")


def field_location(field: str) -> list[str | int]:
    """``space.kernel_sizes[1]`` -> ``["body", "space", "kernel_sizes", 1]``."""
    location: list[str | int] = ["body"]
    for part in field.split("."):
        match = _INDEX.match(part)
        if match:
            location += [match.group(1), int(match.group(2))]
        elif part != "spec":
            location.append(part)
    return location


def _invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidValue)
    detail = {
        "loc": field_location(exc.field),
        "msg": str(exc),
        "type": "value_error",
        "field": exc.field,
        "allowed": exc.allowed,
    }
    return JSONResponse({"detail": [detail]}, status_code=422)


def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)


def _conflict(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)


MAX_JSON_DEPTH = 32
"""The deepest JSON nesting a request body may have (a SearchSpec nests four levels)."""


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in ``body``, strings skipped, in one pass.

    Written by hand: Python's ``json`` has no depth limit and recurses, so a body of ten
    thousand brackets (well under the size limit) ends in a RecursionError, a 500, and this
    must answer before any parser runs. Malformed JSON is left to the parser to refuse."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, and JSON bodies nested deeper than
    :data:`MAX_JSON_DEPTH` with 422, before the route reads them.

    A declared Content-Length over the limit is refused at once; a streamed body is counted
    as it arrives (it is buffered: the limit is small) and refused when it passes the limit.

    Written here rather than FastAPI's ``max_body_size`` (FastAPI 0.164, Starlette 1.6): theirs
    answers a declared length over the limit with a plain-text "Content Too Large", where every
    error of this API is JSON whose ``detail`` names what to change (``max_request_bytes``), and
    it would raise the floor of both dependencies to releases of the last few weeks.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        if b"json" in headers.get(b"content-type", b"") and json_depth(body) > MAX_JSON_DEPTH:
            detail = {
                "loc": ["body"],
                "msg": f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                "type": "value_error",
                "field": "body",
                "allowed": f"JSON nested at most {MAX_JSON_DEPTH} levels deep",
            }
            await JSONResponse({"detail": [detail]}, status_code=422)(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.limit} bytes (max_request_bytes)"},
            status_code=413,
        )
        await response(scope, receive, send)


class RequestTimer:
    """Observe each request's latency by method, route template and status."""

    def __init__(self, app: ASGIApp, histogram: Any) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.histogram.labels(scope["method"], route_template(scope), str(status_code)).observe(
                time.perf_counter() - start
            )


def route_template(scope: Scope) -> str:
    """The matched route as a template (``/api/v1/searches/{search_id}``), from the path and
    its path parameters: FastAPI's ``scope["route"]`` of an included router lacks the prefix.
    Unmatched paths share one label, so that probing does not grow the metric without bound."""
    if scope.get("route") is None:
        return "unmatched"
    names = {str(value): name for name, value in (scope.get("path_params") or {}).items()}
    segments = scope["path"].split("/")
    return "/".join(f"{{{names[s]}}}" if s in names else s for s in segments)


def publish_spec_schema(app: FastAPI) -> None:
    """Put the SearchSpec models' JSON schema into the OpenAPI document's components, where the
    submit operation's body refers to it. The body is declared by hand (parsed only once the
    caller is known, see ``routes.searches.spec_body``), so FastAPI would not collect it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        if "SearchSpec" not in schemas:
            spec = SearchSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(spec.pop("$defs", {}))
            schemas["SearchSpec"] = spec
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    """The app around ``db`` (default: the settings' database, opened here and closed when the
    app shuts down). The schema must be migrated already (``cbam-nas serve`` does it)."""
    settings = settings or get_settings()
    owns_db = db is None
    database = db or open_database(settings.database_url, role="api")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Everything imported so far (torch, optuna, ...) lives as long as the process: keep it
        # out of the collector's full passes, which otherwise walk ~500k objects every few
        # requests and set the latency tail.
        gc.collect()
        gc.freeze()
        yield
        if owns_db:
            database.close()

    app = FastAPI(
        title="cbam-nas",
        summary="Search where and how to put CBAM attention into a CNN.",
        version="1",
        lifespan=lifespan,
    )
    registry, latency = ops.metrics_registry(database)
    app.state.db = database
    app.state.settings = settings
    app.state.store = artifact_store(settings)
    app.state.metrics = registry
    app.state.schema_head = database.head_revision()

    for router in (
        searches.router,
        trials.router,
        files.router,
        meta.router,
        me.router,
        attention.router,
        analysis.router,
    ):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(ops.router)
    app.add_exception_handler(InvalidValue, _invalid)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestTimer, histogram=latency)

    app.include_router(dashboard.router)
    app.mount("/static", dashboard.static_files(), name="static")
    publish_spec_schema(app)
    return app
