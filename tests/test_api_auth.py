"""Auth of the REST API, derived from the app's own routes: every route under ``/api/v1`` needs a
valid token (reads too, unless ``read_open``) whose scope allows it (read < write < admin),
tokens are stored hashed, revoked tokens stop working, and the operations endpoints answer
without one.

The routes are enumerated from ``create_app(...).routes``, so a route added later without
``Reader``/``Writer``/``Admin`` fails here, and each is tried with a token of each scope.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update

from search.errors import InvalidValue
from search.settings import Settings, get_settings
from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import ApiToken, Search, SearchState
from search.store.searches import cancel_search, create_search
from service.api import deps
from service.api.deps import admin_access, read_access, write_access
from service.app import API_PREFIX, create_app
from service.auth import (
    create_token,
    ensure_admin_token,
    list_tokens,
    read_token_file,
    revoke_token,
    verify_token,
    write_token_file,
)
from service.scopes import TOKEN_SCOPES

DUMMY_ID = "0123456789abcdef0123456789abcdef"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
KNOWN_ROUTES = {
    ("POST", "/api/v1/searches"),
    ("GET", "/api/v1/searches"),
    ("GET", "/api/v1/searches/{search_id}"),
    ("POST", "/api/v1/searches/{search_id}/cancel"),
    ("DELETE", "/api/v1/searches/{search_id}"),
    ("GET", "/api/v1/searches/{search_id}/trials"),
    ("GET", "/api/v1/searches/{search_id}/trials/{number}"),
    ("GET", "/api/v1/searches/{search_id}/leaderboard"),
    ("GET", "/api/v1/searches/{search_id}/best"),
    ("GET", "/api/v1/searches/{search_id}/trials/{number}/files/{name}"),
    ("GET", "/api/v1/me"),
}
# What destroys needs an admin token; every other state change a write token; reads any token.
ADMIN_ROUTES = {("DELETE", "/api/v1/searches/{search_id}")}
OPS_ROUTES = ("/healthz", "/readyz", "/metrics")
# The dashboard's session cookie: a token there opens reads, never writes.
TOKEN_COOKIE = getattr(deps, "TOKEN_COOKIE", "cbam_nas_token")
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


# -- route enumeration ---------------------------------------------------------------------------


def _route_objects(app: Any) -> Iterator[Any]:
    """Every route of the app with its full path: FastAPI >= 0.16x includes routers lazily
    (``app.routes`` then holds included-router entries; ``iter_route_contexts`` flattens them),
    older versions copy the routes into ``app.routes``."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from iter_contexts(app.routes) if iter_contexts is not None else app.routes


def _original(route: Any) -> Any:
    return getattr(route, "original_route", route)


def _param_annotations(route: Any) -> dict[str, Any]:
    if not isinstance(_original(route), APIRoute):
        return {}
    return {p.name: p.field_info.annotation for p in route.dependant.path_params}


def _dummy(name: str, annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str(next(iter(annotation)).value)  # e.g. weights.safetensors
    if annotation is int or name in ("number", "attempt"):
        return "0"
    return DUMMY_ID


def concrete_path(route: Any) -> str:
    """The route's path with each parameter filled with a value its type accepts."""
    annotations = _param_annotations(route)
    return _PARAM.sub(lambda m: _dummy(m.group(1), annotations.get(m.group(1))), route.path)


def api_endpoints(app: Any) -> list[tuple[str, str, Any]]:
    """(method, path template, route) for every method of every route under /api/v1."""
    out = []
    for route in _route_objects(app):
        path = getattr(route, "path", None)
        if path is None or not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            continue
        methods = getattr(route, "methods", None) or {"GET"}
        out += [(method, path, route) for method in sorted(methods) if method != "HEAD"]
    return out


def _dependency_calls(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)


def _call(client: TestClient, method: str, url: str, **kwargs: Any) -> Any:
    if method in MUTATING:
        # A valid (default) spec, so that nothing but auth can refuse it.
        kwargs.setdefault("json", {"budget": {"trials": 1}})
    return client.request(method, url, **kwargs)


def _count_searches(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Search)) or 0


def required_scope(method: str, path: str) -> str:
    """The least scope a route needs: the rule this module holds every route to."""
    if (method, path) in ADMIN_ROUTES:
        return "admin"
    return "write" if method in MUTATING else "read"


def _allows(scope: str, required: str) -> bool:
    return TOKEN_SCOPES.index(scope) >= TOKEN_SCOPES.index(required)


def _stored(db: Database) -> dict[str, Any]:
    """What a refused request must leave as it was: the searches with their states, the
    tokens with their scopes."""
    with db.session() as session:
        searches = {row.id: (row.state, row.name) for row in session.scalars(select(Search))}
        tokens = {row.name: (row.scope, row.revoked) for row in session.scalars(select(ApiToken))}
    return {"searches": searches, "tokens": tokens}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def db(any_db: Database) -> Database:
    return any_db


def _app(db: Database, settings: Settings, **overrides: Any) -> Any:
    return create_app(settings.model_copy(update=overrides), db=db)


@pytest.fixture
def closed_client(db: Database, settings: Settings) -> Iterator[TestClient]:
    with TestClient(_app(db, settings, read_open=False), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def bad_tokens(db: Database) -> dict[str, str]:
    """Tokens that must be refused: malformed, unknown id, wrong secret, revoked."""
    good = create_token(db, "good")
    revoked = create_token(db, "revoked")
    assert revoke_token(db, "revoked")
    prefix, token_id, secret = good.split("_", 2)
    return {
        "garbage": "not-a-token",
        "unknown id": f"{prefix}_987654_{secret}",
        "wrong secret": f"{prefix}_{token_id}_{'A' * len(secret)}",
        "truncated secret": good[:-1],
        "revoked": revoked,
    }


@pytest.fixture
def scoped(db: Database) -> dict[str, str]:
    """A token of each scope, by scope."""
    return {scope: create_token(db, f"{scope}-token", scope=scope) for scope in TOKEN_SCOPES}


@pytest.fixture
def targets(db: Database) -> dict[str, str]:
    """Searches that a request let through would change: a queued one (cancel would cancel it)
    and a finished one (delete would delete it)."""
    active = create_search(db, SearchSpec(), name="active")
    finished = create_search(db, SearchSpec(), name="finished")
    cancel_search(db, finished.id)
    return {"active": active.id, "finished": finished.id}


# -- the route list itself -----------------------------------------------------------------------


def test_routes_are_enumerated_from_the_app(sqlite_db: Database, settings: Settings) -> None:
    app = _app(sqlite_db, settings)
    endpoints = api_endpoints(app)
    assert endpoints, "no route under /api/v1 found: the enumeration is broken"
    found = {(method, path) for method, path, _ in endpoints}
    assert found >= KNOWN_ROUTES, f"missing: {KNOWN_ROUTES - found}"
    # Every API route is a FastAPI route whose path parameters can be filled.
    for method, path, route in endpoints:
        assert isinstance(_original(route), APIRoute), (method, path)
        assert "{" not in concrete_path(route), (method, path)
    file_route = next(r for m, p, r in endpoints if p.endswith("/files/{name}"))
    assert concrete_path(file_route).endswith("/trials/0/files/weights.safetensors")
    # The operations routes are outside /api/v1.
    all_paths = {getattr(route, "path", None) for route in _route_objects(app)}
    assert set(OPS_ROUTES) <= all_paths


def test_every_api_route_depends_on_its_scope(sqlite_db: Database, settings: Settings) -> None:
    """The static side of the checks below: admin routes need the Admin, other mutating routes
    the Writer, the rest at least the Reader."""
    endpoints = api_endpoints(_app(sqlite_db, settings))
    assert {(method, path) for method, path, _ in endpoints} >= ADMIN_ROUTES
    for method, path, route in endpoints:
        calls = set(_dependency_calls(route.dependant))
        needed = {"read": read_access, "write": write_access, "admin": admin_access}
        required = required_scope(method, path)
        assert needed[required] in calls, f"{method} {path} does not depend on {required}_access"
        if required != "admin":
            assert admin_access not in calls, f"{method} {path} needs admin: add it to ADMIN_ROUTES"


# -- 401 everywhere ------------------------------------------------------------------------------


def test_every_api_route_refuses_a_missing_token(closed_client: TestClient, db: Database) -> None:
    failures = []
    for method, path, route in api_endpoints(closed_client.app):
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
            response = _call(closed_client, method, concrete_path(route), headers=headers)
            if response.status_code != 401:
                failures.append(f"{method} {path} {headers}: {response.status_code}")
            elif "Bearer" not in response.headers.get("www-authenticate", ""):
                failures.append(f"{method} {path}: 401 without WWW-Authenticate: Bearer")
    assert not failures, "\n".join(failures)
    assert _count_searches(db) == 0


def test_every_api_route_refuses_an_invalid_or_revoked_token(
    closed_client: TestClient, db: Database, bad_tokens: dict[str, str]
) -> None:
    failures = []
    for method, path, route in api_endpoints(closed_client.app):
        for kind, token in bad_tokens.items():
            headers = {"Authorization": f"Bearer {token}"}
            response = _call(closed_client, method, concrete_path(route), headers=headers)
            if response.status_code != 401:
                failures.append(f"{method} {path} with a {kind} token: {response.status_code}")
    assert not failures, "\n".join(failures)
    assert _count_searches(db) == 0


# -- scopes --------------------------------------------------------------------------------------


def _aimed(route: Any, path: str, targets: dict[str, str]) -> str:
    """The route's path aimed at a search the request would change: the queued one for a
    cancel, the finished one for the rest (a delete would delete it)."""
    target = targets["active"] if path.endswith("/cancel") else targets["finished"]
    return concrete_path(route).replace(DUMMY_ID, target)


def test_every_route_against_every_scope(
    closed_client: TestClient, db: Database, scoped: dict[str, str], targets: dict[str, str]
) -> None:
    """Each route with a token of each scope, no token and an invalid one. What the scope allows
    gets past auth (the unknown search is then a 404; a valid submit a 201). What it does not is
    refused, aimed at a search it would change: 403 naming the token's scope and the one needed
    for a valid token, 401 without one, and nothing stored changes."""
    callers = {scope: {"Authorization": f"Bearer {token}"} for scope, token in scoped.items()}
    callers["none"] = {}
    callers["invalid"] = {"Authorization": "Bearer not-a-token"}
    failures, tried = [], set()
    for method, path, route in api_endpoints(closed_client.app):
        required = required_scope(method, path)
        for caller, headers in callers.items():
            allowed = caller in TOKEN_SCOPES and _allows(caller, required)
            tried.add((caller, required, allowed))
            if allowed:
                response = _call(closed_client, method, concrete_path(route), headers=headers)
                if response.status_code in (401, 403) or response.status_code >= 500:
                    failures.append(f"{method} {path} as {caller}: {response.status_code}")
                continue
            before = _stored(db)
            response = _call(closed_client, method, _aimed(route, path, targets), headers=headers)
            expected = 403 if caller in TOKEN_SCOPES else 401
            detail = str(response.json().get("detail", "")) if response.content else ""
            if response.status_code != expected:
                failures.append(f"{method} {path} as {caller}: {response.status_code} {detail}")
            elif expected == 403 and not (
                f"scope {caller!r}" in detail and f"needs scope {required!r}" in detail
            ):
                failures.append(
                    f"{method} {path} as {caller}: 403 does not say the scopes: {detail}"
                )
            if _stored(db) != before:
                failures.append(f"{method} {path} as {caller}: refused, but something changed")
    assert not failures, "\n".join(failures)
    # Every kind of refusal was tried.
    for case in (("read", "write", False), ("read", "admin", False), ("write", "admin", False)):
        assert case in tried, case
    assert ("read", "read", True) in tried and ("admin", "admin", True) in tried


def test_write_submits_and_cancels_and_admin_also_deletes(
    closed_client: TestClient, db: Database, scoped: dict[str, str], targets: dict[str, str]
) -> None:
    read, write, admin = ({"Authorization": f"Bearer {scoped[s]}"} for s in TOKEN_SCOPES)
    active, finished = targets["active"], targets["finished"]
    listed = closed_client.get("/api/v1/searches", headers=read)
    assert listed.status_code == 200 and listed.json()["total"] == 2
    assert closed_client.get(f"/api/v1/searches/{active}", headers=read).status_code == 200
    # A read token is refused before its body is looked at: no validation message leaks.
    for body in (b"{not json", b'{"budget": {"trials": -1}}'):
        refused = closed_client.post("/api/v1/searches", content=body, headers=read)
        assert refused.status_code == 403, refused.text
    submitted = closed_client.post(
        "/api/v1/searches", json={"budget": {"trials": 1}}, headers=write
    )
    assert submitted.status_code == 201, submitted.text
    cancelled = closed_client.post(f"/api/v1/searches/{active}/cancel", headers=write)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    refused = closed_client.delete(f"/api/v1/searches/{finished}", headers=write)
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("forbidden: token 'write-token' has scope 'write'")
    assert finished in _stored(db)["searches"]
    assert closed_client.delete(f"/api/v1/searches/{finished}", headers=admin).status_code == 204
    stored = _stored(db)["searches"]
    assert finished not in stored and stored[active][0] == SearchState.cancelled
    assert stored[submitted.json()["id"]][0] == SearchState.queued


def test_a_scope_this_version_does_not_know_allows_nothing(
    closed_client: TestClient, db: Database
) -> None:
    token = create_token(db, "from-the-future")
    with db.session() as session:
        session.execute(
            update(ApiToken).where(ApiToken.name == "from-the-future").values(scope="owner")
        )
    headers = {"Authorization": f"Bearer {token}"}
    assert closed_client.get("/api/v1/searches", headers=headers).status_code == 403
    assert closed_client.post("/api/v1/searches", json={}, headers=headers).status_code == 403


def test_me_says_what_the_caller_may_do(
    db: Database, settings: Settings, scoped: dict[str, str]
) -> None:
    expected = {
        "read": {"can_write": False, "can_admin": False},
        "write": {"can_write": True, "can_admin": False},
        "admin": {"can_write": True, "can_admin": True},
    }
    with TestClient(_app(db, settings, read_open=False)) as client:
        for scope, token in scoped.items():
            answer = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200
            assert answer.json() == {"name": f"{scope}-token", "scope": scope, **expected[scope]}
        assert client.get("/api/v1/me").status_code == 401
    with TestClient(_app(db, settings, read_open=True)) as client:
        anonymous = client.get("/api/v1/me")
        assert anonymous.status_code == 200
        assert anonymous.json() == {
            "name": None,
            "scope": "read",
            "can_write": False,
            "can_admin": False,
        }
        bad = client.get("/api/v1/me", headers={"Authorization": "Bearer not-a-token"})
        assert bad.status_code == 401


def test_read_open_opens_gets_only(db: Database, settings: Settings) -> None:
    app = _app(db, settings, read_open=True)
    tokens = {}
    revoked = create_token(db, "revoked")
    revoke_token(db, "revoked")
    tokens["revoked"] = revoked
    tokens["garbage"] = "not-a-token"
    failures = []
    with TestClient(app, raise_server_exceptions=False) as client:
        endpoints = api_endpoints(app)
        assert any(method == "GET" for method, _, _ in endpoints)
        assert any(method in MUTATING for method, _, _ in endpoints)
        for method, path, route in endpoints:
            url = concrete_path(route)
            anonymous = _call(client, method, url)
            if method in MUTATING and anonymous.status_code != 401:
                failures.append(f"{method} {path} without a token: {anonymous.status_code}")
            if method not in MUTATING and anonymous.status_code == 401:
                failures.append(f"{method} {path} is 401 although reads are open")
            # A token that is sent must still be valid, for reads too.
            for kind, token in tokens.items():
                headers = {"Authorization": f"Bearer {token}"}
                response = _call(client, method, url, headers=headers)
                if response.status_code != 401:
                    failures.append(f"{method} {path} with a {kind} token: {response.status_code}")
        listed = client.get("/api/v1/searches")
        assert listed.status_code == 200
        assert listed.json()["total"] == 0
    assert not failures, "\n".join(failures)
    assert _count_searches(db) == 0


def test_read_open_from_the_environment(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBAM_NAS_READ_OPEN", "1")
    get_settings.cache_clear()
    assert get_settings().read_open
    with TestClient(create_app(db=sqlite_db)) as client:
        assert client.get("/api/v1/searches").status_code == 200
        assert client.get(f"/api/v1/searches/{DUMMY_ID}").status_code == 404
        assert client.post("/api/v1/searches", json={}).status_code == 401
        assert client.delete(f"/api/v1/searches/{DUMMY_ID}").status_code == 401
    monkeypatch.setenv("CBAM_NAS_READ_OPEN", "0")
    get_settings.cache_clear()
    with TestClient(create_app(db=sqlite_db)) as client:
        assert client.get("/api/v1/searches").status_code == 401


@pytest.mark.parametrize("read_open", [False, True], ids=["closed", "read_open"])
def test_a_cookie_never_opens_writes(db: Database, settings: Settings, read_open: bool) -> None:
    """A valid token in the cookie must not authorise a change (CSRF): mutating routes take
    the Authorization header only. An invalid cookie token is refused on reads too."""
    valid = create_token(db, "dashboard")
    revoked = create_token(db, "old")
    revoke_token(db, "old")
    app = _app(db, settings, read_open=read_open)
    failures = []
    for cookie, kind in ((valid, "valid"), (revoked, "revoked"), ("not-a-token", "garbage")):
        with TestClient(
            app, cookies={TOKEN_COOKIE: cookie}, raise_server_exceptions=False
        ) as client:
            for method, path, route in api_endpoints(app):
                response = _call(client, method, concrete_path(route))
                expect_401 = method in MUTATING or kind != "valid"
                if expect_401 != (response.status_code == 401):
                    failures.append(f"{method} {path}, {kind} cookie: {response.status_code}")
    assert not failures, "\n".join(failures)
    assert _count_searches(db) == 0


def test_token_id_out_of_integer_range_is_401_not_500(
    closed_client: TestClient, db: Database
) -> None:
    """A well-formed token whose id does not fit the id column is just an unknown token.

    Fails on SQLite (``OverflowError: Python int too large to convert to SQLite INTEGER`` from
    ``session.get(ApiToken, token_id)`` in ``service.auth.verify_token``): an unauthenticated
    caller gets a 500.
    """
    secret = "a" * 43
    for token_id in (2**31, 2**63, 10**30):
        headers = {"Authorization": f"Bearer cbn_{token_id}_{secret}"}
        response = closed_client.get("/api/v1/searches", headers=headers)
        assert response.status_code == 401, (token_id, response.status_code)


def test_malformed_body_without_a_token_is_401(closed_client: TestClient) -> None:
    response = closed_client.post(
        "/api/v1/searches", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401


# -- tokens --------------------------------------------------------------------------------------


def test_tokens_are_stored_hashed(db: Database) -> None:
    tokens = [create_token(db, name) for name in ("alice", "bob@example.org", "ci-1")]
    secrets = [token.split("_", 2)[2] for token in tokens]
    with db.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_tokens")).mappings().all()
    assert len(rows) == len(tokens)
    for row in rows:
        assert len(row["token_hash"]) == 64
        int(row["token_hash"], 16)  # a hex digest
        for value in row.values():
            cell = str(value)
            for token, secret in zip(tokens, secrets, strict=True):
                assert token not in cell
                assert secret not in cell
    with db.session() as session:
        hashes = set(session.scalars(select(ApiToken.token_hash)))
    assert not hashes & set(tokens) and not hashes & set(secrets)


def test_scope_defaults_to_admin_and_a_bad_scope_stores_nothing(db: Database) -> None:
    """Tokens made without a scope are admin, as every token was before scopes."""
    create_token(db, "legacy")
    for bad in ("owner", "", "READ", "read ", None, 1):
        with pytest.raises(InvalidValue) as info:
            create_token(db, "bad", scope=bad)  # type: ignore[arg-type]
        assert info.value.field == "scope"
        assert info.value.allowed == "'read', 'write', 'admin'"
    assert [(row.name, row.scope) for row in list_tokens(db)] == [("legacy", "admin")]


def test_ensure_admin_token_replaces_a_token_that_is_not_admin(
    db: Database, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    write_token_file(path, create_token(db, "viewer", scope="read"))
    token, created = ensure_admin_token(db, path)
    row = verify_token(db, token)
    assert created and row is not None and row.scope == "admin"
    assert read_token_file(path) == token
    assert ensure_admin_token(db, path) == (token, False)


def test_a_token_works_until_revoked(db: Database, settings: Settings) -> None:
    token = create_token(db, "worker-1")
    other = create_token(db, "worker-2")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(_app(db, settings, read_open=False)) as client:
        assert client.get("/api/v1/searches", headers=headers).status_code == 200
        assert client.get(f"/api/v1/searches/{DUMMY_ID}", headers=headers).status_code == 404
        assert client.post(f"/api/v1/searches/{DUMMY_ID}/cancel", headers=headers).status_code == (
            404
        )
        assert revoke_token(db, "worker-1")
        assert client.get("/api/v1/searches", headers=headers).status_code == 401
        assert client.post("/api/v1/searches", json={}, headers=headers).status_code == 401
        assert client.post(f"/api/v1/searches/{DUMMY_ID}/cancel", headers=headers).status_code == (
            401
        )
        # Revoking one token leaves the others working.
        other_headers = {"Authorization": f"Bearer {other}"}
        assert client.get("/api/v1/searches", headers=other_headers).status_code == 200
    assert not revoke_token(db, "no-such-token")
    with db.session() as session:
        used = session.scalars(select(ApiToken).where(ApiToken.name == "worker-1")).one()
    assert used.revoked and used.last_used_at is not None


def test_operations_endpoints_need_no_token(sqlite_db: Database, settings: Settings) -> None:
    with TestClient(_app(sqlite_db, settings, read_open=False)) as client:
        for path in OPS_ROUTES:
            assert client.get(path).status_code == 200, path
            bad = client.get(path, headers={"Authorization": "Bearer not-a-token"})
            assert bad.status_code == 200, path
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["status"] == "ok"
        assert "cbam_nas_searches" in client.get("/metrics").text
