"""The API fuzzed from its own OpenAPI document (schemathesis): no input answers 5xx, and every
answer matches the schema the document gives for it.

Every operation gets a bounded, derandomised set of generated requests (valid and invalid by
the document) against the real app on a fresh SQLite database holding one search, with an
admin token: a failure reproduces, and a found case becomes a regression test in test_api.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation
from support import quick_spec

from search.settings import Settings
from search.store.engine import Database
from search.store.searches import create_search
from service.app import create_app
from service.auth import create_token

EXAMPLES_PER_OPERATION = 12


@pytest.fixture
def fuzzed_app(sqlite_db: Database, settings: Settings) -> Iterator[tuple[object, str, str]]:
    search = create_search(sqlite_db, quick_spec(trials=2))
    app = create_app(settings, db=sqlite_db)
    token = create_token(sqlite_db, "fuzzer")
    with TestClient(app):  # runs the app's lifespan
        yield app, token, search.id


def both(operation: APIOperation) -> st.SearchStrategy[schemathesis.Case]:
    """Requests the document allows, and requests it forbids (out of bounds, wrong types),
    which must be refused with a 4xx rather than reach the database."""
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )


def test_no_input_answers_5xx_and_every_answer_matches_its_schema(
    fuzzed_app: tuple[object, str, str],
) -> None:
    """Driven by hand rather than by ``schemathesis.pytest.from_fixture``, which does not work
    with pytest 9 (it reads a private ``_nodeid``): each operation's cases come from its
    strategy, and a failure names the operation."""
    app, token, search_id = fuzzed_app
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 20

    calls: list[str] = []
    for operation in operations:

        @given(case=both(operation))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            calls.append(case.operation.label)
            checks = [not_a_server_error, response_schema_conformance]
            case.call_and_validate(headers=headers, checks=checks)
            if "search_id" in (case.path_parameters or {}) and case.method != "DELETE":
                # Generated ids find nothing; the same request on the search that exists
                # reaches past the lookup into the route.
                case.path_parameters["search_id"] = search_id
                case.call_and_validate(headers=headers, checks=checks)

        try:
            fuzz()
        except Exception as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc
    assert len(set(calls)) == len(operations)  # every operation was called
