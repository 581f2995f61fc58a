"""FastAPI dependencies: the app's database, settings and artifact store, and the caller.

Every route of the API router depends on :func:`read_access` (reads), :func:`write_access`
(what changes state: submit, cancel) or :func:`admin_access` (what destroys: delete);
``tests/test_api_auth.py`` enumerates the routes to hold that, with a token of each scope. A
stranger gets 401 first; a known token whose scope is too small gets 403.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from search.pareto import OVERHEAD_COLUMNS
from search.settings import Settings
from search.store.engine import Database
from search.store.models import ApiToken
from service.auth import verify_token
from service.scopes import TOKEN_SCOPES, scope_allows

_bearer = HTTPBearer(auto_error=False, description="An API token: cbam-nas token create")
# The dashboard keeps the token in a session cookie too, so that plain links (downloads) work.
# Reads only: a cookie rides along with cross-site requests, a Bearer header never does, so
# nothing that changes state accepts it (no CSRF).
TOKEN_COOKIE = "cbam_nas_token"
_cookie = APIKeyCookie(name=TOKEN_COOKIE, auto_error=False, description="Reads only.")


def database(request: Request) -> Database:
    return request.app.state.db


def settings(request: Request) -> Settings:
    return request.app.state.settings


def artifact_store(request: Request) -> Any:
    return request.app.state.store


DB = Annotated[Database, Depends(database)]
AppSettings = Annotated[Settings, Depends(settings)]
Store = Annotated[Any, Depends(artifact_store)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

# Every integer a caller names is bounded by what an INTEGER column holds (PostgreSQL's 32 bits),
# so that none reaches the database to overflow there (a 500) rather than being refused (a 422).
INT_MAX = 2**31 - 1
TrialNumber = Annotated[
    int, PathParam(ge=0, le=INT_MAX, description="The trial's number within its search.")
]
Attempt = Annotated[
    int | None,
    Query(ge=0, le=INT_MAX, description="Which attempt of a re-run trial (default: the last)."),
]
Offset = Annotated[int, Query(ge=0, le=INT_MAX, description="How many items to skip.")]

Overhead = Enum("Overhead", {name: name for name in OVERHEAD_COLUMNS}, type=str)  # type: ignore[misc]
"""The overhead a route ranks or bounds by (params, macs, latency), a query parameter."""


def _caller(db: Database, credentials: HTTPAuthorizationCredentials | str | None) -> ApiToken:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing token: send Authorization: Bearer <token> (cbam-nas token create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    presented = credentials if isinstance(credentials, str) else credentials.credentials
    token = verify_token(db, presented)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return token


def _at_least(token: ApiToken, required: str) -> ApiToken:
    """``token`` if its scope allows what needs ``required``, else 403 saying both scopes."""
    if not scope_allows(token.scope, required):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"forbidden: token {token.name!r} has scope {token.scope!r}; this needs scope "
            f"{required!r} ({' < '.join(TOKEN_SCOPES)})",
        )
    return token


def write_access(db: DB, credentials: Credentials) -> ApiToken:
    """A valid token of scope write or admin, in the Authorization header (never the cookie)."""
    return _at_least(_caller(db, credentials), "write")


def admin_access(db: DB, credentials: Credentials) -> ApiToken:
    """A valid admin token, in the Authorization header (never the cookie)."""
    return _at_least(_caller(db, credentials), "admin")


def read_access(
    db: DB,
    app_settings: AppSettings,
    credentials: Credentials,
    cookie: Annotated[str | None, Depends(_cookie)],
) -> ApiToken | None:
    """A valid token (header, or the dashboard's cookie), unless the server opened reads
    (``read_open``): then anyone, though a token that is sent must still be valid."""
    presented = credentials if credentials is not None else cookie
    if app_settings.read_open and presented is None:
        return None
    return _at_least(_caller(db, presented), "read")


Reader = Depends(read_access)
Writer = Depends(write_access)
Admin = Depends(admin_access)
