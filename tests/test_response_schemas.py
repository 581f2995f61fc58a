"""The OpenAPI document says what every answer holds, and the answers hold to it.

A search explored and confirmed by a dry-run worker answers every GET operation of the API;
each JSON answer must match the schema the document gives for it (schemathesis' conformance
check: types, enums, required keys, and no undeclared key). The fuzzer (test_fuzz.py) checks
the same on an empty search; this one on answers full of figures, the analyses included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import response_schema_conformance
from support import quick_spec

from search.settings import Settings
from search.store.engine import Database
from search.store.searches import create_search
from service.app import create_app
from service.auth import create_token
from workers.options import WorkerOptions
from workers.worker import Worker

# Answers that are files, pictures or text rather than a JSON document of the API.
NOT_JSON = {"/metrics", "/healthz", "/readyz"}


@pytest.fixture
def confirmed(sqlite_db: Database, settings: Settings) -> Iterator[tuple[Any, str, str]]:
    """The app, an admin token and a search explored and confirmed (three seeds per arm)."""
    spec = quick_spec(trials=6, sampler="random", confirm={"min_seeds": 3, "max_seeds": 3})
    search = create_search(sqlite_db, spec)
    assert Worker(WorkerOptions(search_id=search.id, dry_run=True)).run() == 0
    app = create_app(settings, db=sqlite_db)
    token = create_token(sqlite_db, "reader")
    with TestClient(app):
        yield app, token, search.id


def test_every_answer_of_a_confirmed_search_matches_the_document(
    confirmed: tuple[Any, str, str],
) -> None:
    app, token, search_id = confirmed
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"}
    checked: dict[str, int] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "GET" or operation.path in NOT_JSON:
            continue
        names = {p.name for p in operation.path_parameters}
        values = {"search_id": search_id, "number": 0, "name": "architecture.json"}
        case = operation.Case(path_parameters={k: v for k, v in values.items() if k in names})
        response = case.call(headers=headers)
        case.validate_response(response, checks=[response_schema_conformance])
        checked[operation.path] = response.status_code
    answered = {path for path, code in checked.items() if code == 200}
    # The operations this issue typed answered with figures, not an error.
    for path in (
        "/api/v1/searches",
        "/api/v1/searches/{search_id}",
        "/api/v1/searches/{search_id}/trials",
        "/api/v1/searches/{search_id}/trials/{number}",
        "/api/v1/searches/{search_id}/leaderboard",
        "/api/v1/searches/{search_id}/best",
        "/api/v1/searches/{search_id}/scatter",
        "/api/v1/searches/{search_id}/knobs",
        "/api/v1/searches/{search_id}/knob-paths",
        "/api/v1/searches/{search_id}/ablation",
        "/api/v1/searches/{search_id}/curves",
        "/api/v1/searches/{search_id}/importance",
    ):
        assert path in answered, (path, checked.get(path))


def test_the_confirmed_leaderboard_declares_every_figure_it_shows(
    confirmed: tuple[Any, str, str],
) -> None:
    """The board's entries are typed key by key (no bare objects): a generated client sees
    each comparison's delta, interval and verdict, and the convergence figures."""
    app, token, search_id = confirmed
    document = app.openapi()
    schemas = document["components"]["schemas"]
    entry = schemas["LeaderboardEntryOut"]
    assert entry.get("additionalProperties") is False
    for key in ("delta_vs_se", "delta_vs_se_ci95", "verdict_vs_se", "latency_delta_vs_cbam"):
        assert key in entry["properties"], key
    verdict = entry["properties"]["verdict_vs_none"]["anyOf"][0]
    assert verdict["enum"] == ["better", "worse", "tied", "untested"]
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        board = client.get(f"/api/v1/searches/{search_id}/leaderboard").json()
    assert board["confirmed"]
    for shown in board["entries"]:
        assert set(shown) <= set(entry["properties"])
        # Only the overhead asked for is compared (the others are not sent as nulls).
        assert "params_delta_vs_none" in shown and "macs_delta_vs_none" not in shown


def test_every_json_answer_has_a_declared_shape(confirmed: tuple[Any, str, str]) -> None:
    """No operation answers an undescribed object: each 200 JSON answer names its fields."""
    app = confirmed[0]
    document = app.openapi()
    schemas = document["components"]["schemas"]
    untyped = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            content = operation.get("responses", {}).get("200", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            if schema is None or path in NOT_JSON:
                continue
            if not _declared(schema, schemas):
                untyped.append(f"{method.upper()} {path}")
    assert untyped == []


def _declared(schema: dict[str, Any], schemas: dict[str, Any]) -> bool:
    """Whether ``schema`` names its fields (through $ref, arrays and anyOf)."""
    if "$ref" in schema:
        return _declared(schemas[schema["$ref"].rsplit("/", 1)[1]], schemas)
    if "anyOf" in schema:
        return all(_declared(s, schemas) or s.get("type") == "null" for s in schema["anyOf"])
    if schema.get("type") == "array":
        return _declared(schema.get("items", {}), schemas)
    if schema.get("type") == "object" or "properties" in schema:
        return bool(schema.get("properties"))
    return bool(schema)
