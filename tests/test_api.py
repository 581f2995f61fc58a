"""The REST API end to end through ``TestClient``, on SQLite and on PostgreSQL: SearchSpec errors
as 422 with the field's path and the allowed values, 404/409/413, and after every refused request
nothing stored changed; the happy paths of searches, trials, the leaderboard, /best and the
operations endpoints. Trial rows are inserted directly (no worker runs here)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi.routing
import optuna
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from search.datasets import DATASETS
from search.nn.backbones import BACKBONES
from search.settings import Settings
from search.space import Architecture, reference_architectures
from search.spec import OVERHEADS, SearchSpec
from search.store.engine import Database, open_database
from search.store.models import (
    Reference,
    ResultState,
    Search,
    SearchState,
    TrialResult,
    utcnow,
)
from service.app import create_app
from service.auth import create_token

MAX_TRIALS = 50
MAX_BYTES = 4096
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
SPEC = {"name": "api test", "budget": {"trials": 3}}
BACKBONE = "cifar_resnet20"
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def db(any_db: Database) -> Database:
    return any_db


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "max_trials_per_search": MAX_TRIALS,
            "max_request_bytes": MAX_BYTES,
            "read_open": False,
        }
    )


@pytest.fixture
def client(db: Database, app_settings: Settings) -> Iterator[TestClient]:
    token = create_token(db, "tester")
    app = create_app(app_settings, db=db)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as test_client:
        yield test_client


def snapshot(db: Database) -> dict[str, Any]:
    """Everything a refused request must leave alone: the searches (with their state and
    update time), the trial rows and the Optuna studies (with their trial counts)."""
    with db.session() as session:
        searches = sorted(
            (row.id, row.state.value, row.claimed, row.updated_at.isoformat())
            for row in session.scalars(select(Search))
        )
        trials = sorted(
            (row.search_id, row.number, row.attempt, row.state.value)
            for row in session.scalars(select(TrialResult))
        )
    summaries = optuna.get_all_study_summaries(db.optuna_storage(), include_best_trial=False)
    studies = sorted((s.study_name, s.n_trials) for s in summaries)
    return {"searches": searches, "trials": trials, "studies": studies}


def counts(db: Database) -> tuple[int, int, int]:
    with db.session() as session:
        searches = session.scalar(select(func.count()).select_from(Search)) or 0
        trials = session.scalar(select(func.count()).select_from(TrialResult)) or 0
    studies = len(optuna.get_all_study_summaries(db.optuna_storage(), include_best_trial=False))
    return searches, trials, studies


def create(client: TestClient, spec: dict[str, Any] | None = None, **kwargs: Any) -> dict:
    response = client.post("/api/v1/searches", json=SPEC if spec is None else spec, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


def set_state(db: Database, search_id: str, state: SearchState) -> None:
    with db.session() as session:
        session.execute(update(Search).where(Search.id == search_id).values(state=state))


def search_routes(app: Any) -> list[tuple[str, str, str]]:
    """(method, template, concrete path with the unknown id) of every /searches/{search_id}
    route of the app."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = iter_contexts(app.routes) if iter_contexts is not None else app.routes
    out = []
    for route in routes:
        if not isinstance(getattr(route, "original_route", route), APIRoute):
            continue
        if not route.path.startswith("/api/v1/searches/{search_id}"):
            continue
        annotations = {p.name: p.field_info.annotation for p in route.dependant.path_params}

        def fill(match: re.Match[str], annotations: dict[str, Any] = annotations) -> str:
            name = match.group(1)
            annotation = annotations.get(name)
            if name == "search_id":
                return UNKNOWN_ID
            if annotation is int:
                return "0"
            return str(next(iter(annotation)).value)  # an enum: its first member

        out += [(m, route.path, _PARAM.sub(fill, route.path)) for m in sorted(route.methods)]
    return out


# -- 422: SearchSpec errors name the field and the allowed values --------------------------------


INVALID_SPECS: dict[str, tuple[dict[str, Any], list[Any], list[str]]] = {
    "even kernel size": (
        {"space": {"kernel_sizes": [3, 4]}},
        ["body", "space", "kernel_sizes", 1],
        ["1", "3", "5", "7", "9"],
    ),
    "reduction 0": (
        {"space": {"reductions": [16, 0]}},
        ["body", "space", "reductions", 1],
        [">= 1"],
    ),
    "unknown backbone": ({"backbone": "vgg16"}, ["body", "backbone"], sorted(BACKBONES)),
    "unknown dataset": (
        {"dataset": {"name": "imagenet-22k"}},
        ["body", "dataset", "name"],
        list(DATASETS),
    ),
    "empty blocks": ({"space": {"blocks": []}}, ["body", "space", "blocks"], ["non-empty"]),
    "unknown dataset option": (
        {"dataset": {"name": "cluttered-digits", "options": {"canvass": 40}}},
        ["body", "dataset", "options", "canvass"],
        ["'canvas'", "'digit_size'"],
    ),
    "negative dataset size": (
        {"dataset": {"name": "digits", "options": {"size": -8}}},
        ["body", "dataset", "options", "size"],
        [">= 8"],
    ),
    "dataset option of the wrong type": (
        {"dataset": {"name": "synthetic", "options": {"num_classes": "four"}}},
        ["body", "dataset", "options", "num_classes"],
        ["an integer"],
    ),
    "imagefolder without a root": (
        {"dataset": {"name": "imagefolder"}},
        ["body", "dataset", "options", "root"],
        ["class folders"],
    ),
    "confirmation shorter than the warm-up": (
        {"training": {"epochs": 6, "warmup_epochs": 3}, "confirm": {"epochs": 2}},
        ["body", "confirm", "epochs"],
        [">= 4"],
    ),
    "empty stages": ({"space": {"stages": []}}, ["body", "space", "stages"], ["non-empty"]),
    "unknown block choice": (
        {"space": {"blocks": ["all", "middle"]}},
        ["body", "space", "blocks", 1],
        ["all", "first", "last"],
    ),
    "budget over the server's limit": (
        {"budget": {"trials": MAX_TRIALS + 1}},
        ["body", "budget", "trials"],
        [str(MAX_TRIALS)],
    ),
    "unknown overhead": (
        {"objectives": {"overheads": ["params", "energy"]}},
        ["body", "objectives", "overheads", 1],
        list(OVERHEADS),
    ),
    "unknown constraint overhead": (
        {"objectives": {"constraint_overhead": "energy", "constraint_max_pct": 5}},
        ["body", "objectives", "constraint_overhead"],
        list(OVERHEADS),
    ),
    "unknown objective": (
        {"objectives": {"accuracy": "maximize"}},
        ["body", "objectives"],
        ["overheads", "constraint_overhead", "constraint_max_pct"],
    ),
    "unknown top-level field": ({"kernel": 3}, ["body"], ["backbone", "space", "budget"]),
    "a dataset path outside the data roots": (
        {"dataset": {"name": "imagefolder", "options": {"root": "/etc"}}},
        ["body", "dataset", "options", "root"],
        ["CBAM_NAS_DATA_ROOTS"],
    ),
    "a dataset path climbing out of the data roots": (
        {"dataset": {"name": "cifar10", "options": {"root": "../../../../../../.."}}},
        ["body", "dataset", "options", "root"],
        ["CBAM_NAS_DATA_ROOTS"],
    ),
}


# Every case on SQLite; on PostgreSQL one, for "nothing stored" there: the spec is refused by its
# validation before either database is written, so the other 18 would add nothing but seconds.
INVALID_CASES = [
    pytest.param(case, database, id=f"{database}-{case}")
    for database, cases in (
        ("sqlite", list(INVALID_SPECS)),
        ("postgresql", list(INVALID_SPECS)[:1]),
    )
    for case in cases
]


@pytest.mark.parametrize(("case", "any_db"), INVALID_CASES, indirect=["any_db"])
def test_invalid_spec_is_422_naming_the_field_and_the_allowed_values(
    client: TestClient, db: Database, case: str
) -> None:
    body, location, allowed = INVALID_SPECS[case]
    before = snapshot(db)
    response = client.post("/api/v1/searches", json=body)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == location
    for value in allowed:
        assert value in detail["allowed"], (value, detail["allowed"])
        assert value in detail["msg"]
    assert snapshot(db) == before


def test_a_download_is_refused_where_the_settings_forbid_it(
    db: Database, app_settings: Settings
) -> None:
    spec = {**SPEC, "dataset": {"name": "cifar10", "options": {"download": True}}}
    no_downloads = create_app(app_settings.model_copy(update={"allow_downloads": False}), db=db)
    token = create_token(db, "downloader")
    with TestClient(no_downloads, headers={"Authorization": f"Bearer {token}"}) as strict:
        before = snapshot(db)
        response = strict.post("/api/v1/searches", json=spec)
        assert response.status_code == 422, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", "dataset", "options", "download"]
        assert "CBAM_NAS_ALLOW_DOWNLOADS" in detail["allowed"]
        assert snapshot(db) == before
        spec["dataset"]["options"]["download"] = False
        assert strict.post("/api/v1/searches", json=spec).status_code == 201


def test_a_dataset_path_inside_the_data_roots_is_accepted_and_a_symlink_out_is_not(
    client: TestClient, db: Database, app_settings: Settings, tmp_path: Path
) -> None:
    inside = app_settings.data_dir / "my-images"
    spec = {**SPEC, "dataset": {"name": "imagefolder", "options": {"root": str(inside)}}}
    assert create(client, spec)["spec"]["dataset"]["options"]["root"] == str(inside)
    link = app_settings.data_dir / f"escape-{tmp_path.name}"
    link.symlink_to(tmp_path)
    try:
        before = snapshot(db)
        spec["dataset"]["options"]["root"] = str(link)
        response = client.post("/api/v1/searches", json=spec)
        assert response.status_code == 422, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", "dataset", "options", "root"]
        assert str(app_settings.data_dir.resolve()) in detail["msg"]
        assert snapshot(db) == before
    finally:
        link.unlink()


def test_the_budget_at_the_limit_is_accepted(client: TestClient) -> None:
    created = create(client, {"budget": {"trials": MAX_TRIALS}})
    assert created["budget_trials"] == MAX_TRIALS


NOT_A_SPEC = {
    "list": b"[1, 2]",
    "string": b'"a spec"',
    "number": b"42",
    "null": b"null",
    "malformed": b"{not json",
    "trailing": b"{}}",
    "empty": b"",
    "truncated": b'{"budget": {"trials": 3',
}


def test_non_object_or_malformed_json_is_422(client: TestClient, db: Database) -> None:
    before = snapshot(db)
    for case, content in NOT_A_SPEC.items():
        response = client.post(
            "/api/v1/searches", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (case, response.text)
        assert response.json()["detail"][0]["loc"][0] == "body", case
    assert snapshot(db) == before


def test_idempotency_key_too_long_is_422(client: TestClient, db: Database) -> None:
    before = snapshot(db)
    response = client.post("/api/v1/searches", json=SPEC, headers={"Idempotency-Key": "k" * 201})
    assert response.status_code == 422
    assert snapshot(db) == before


def test_invalid_list_query_is_422(client: TestClient) -> None:
    for query in ("limit=0", "limit=501", "offset=-1", "state=paused", "limit=ten"):
        assert client.get(f"/api/v1/searches?{query}").status_code == 422, query


# -- 404, 409, 413 -------------------------------------------------------------------------------


def test_unknown_search_is_404_on_every_search_route(client: TestClient, db: Database) -> None:
    create(client)  # another search exists
    routes = search_routes(client.app)
    templates = {template for _, template, _ in routes}
    assert {
        "/api/v1/searches/{search_id}",
        "/api/v1/searches/{search_id}/cancel",
        "/api/v1/searches/{search_id}/trials",
        "/api/v1/searches/{search_id}/trials/{number}",
        "/api/v1/searches/{search_id}/leaderboard",
        "/api/v1/searches/{search_id}/best",
        "/api/v1/searches/{search_id}/trials/{number}/files/{name}",
    } <= templates
    before = snapshot(db)
    failures = []
    for method, template, path in routes:
        response = client.request(method, path)
        if response.status_code != 404 or UNKNOWN_ID not in response.json()["detail"]:
            failures.append(f"{method} {template}: {response.status_code} {response.text}")
    assert not failures, "\n".join(failures)
    assert snapshot(db) == before


def test_illegal_state_changes_are_409(client: TestClient, db: Database) -> None:
    search_id = create(client)["id"]

    def refused(method: str, path: str) -> str:
        before = snapshot(db)
        response = client.request(method, path)
        assert response.status_code == 409, (method, path, response.text)
        assert snapshot(db) == before
        return response.json()["detail"]

    # Queued or running: no delete.
    assert "queued" in refused("DELETE", f"/api/v1/searches/{search_id}")
    set_state(db, search_id, SearchState.running)
    assert "running" in refused("DELETE", f"/api/v1/searches/{search_id}")
    # Cancelled, completed, failed: no cancel.
    assert client.post(f"/api/v1/searches/{search_id}/cancel").status_code == 200
    assert "cancelled" in refused("POST", f"/api/v1/searches/{search_id}/cancel")
    for state in (SearchState.completed, SearchState.failed):
        set_state(db, search_id, state)
        assert state.value in refused("POST", f"/api/v1/searches/{search_id}/cancel")
    # A trial that still runs keeps a finished search from being deleted.
    with db.session() as session:
        session.add(_row(search_id, 0, "running", None, _cbam(), 0.5, 270_000, 1.0))
    assert "still stopping" in refused("DELETE", f"/api/v1/searches/{search_id}")
    assert client.get(f"/api/v1/searches/{search_id}").status_code == 200


def _padded(spec: dict[str, Any], size: int) -> bytes:
    """``spec`` as JSON of exactly ``size`` bytes (trailing spaces)."""
    body = json.dumps(spec).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_body_over_the_limit_is_413(client: TestClient, db: Database) -> None:
    headers = {"Content-Type": "application/json"}
    before = snapshot(db)
    # Declared with Content-Length.
    response = client.post(
        "/api/v1/searches", content=_padded(SPEC, MAX_BYTES + 1), headers=headers
    )
    assert response.status_code == 413, response.text
    assert "max_request_bytes" in response.json()["detail"]
    # Streamed (chunked, no Content-Length): counted as it arrives.
    body = _padded(SPEC, 3 * MAX_BYTES)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = client.post("/api/v1/searches", content=chunks(), headers=headers)
    assert response.status_code == 413, response.text
    # Other writes too, whatever the route.
    response = client.post(
        f"/api/v1/searches/{UNKNOWN_ID}/cancel", content=b"x" * (MAX_BYTES + 1), headers=headers
    )
    assert response.status_code == 413
    assert snapshot(db) == before


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_json_nested_too_deep_is_422_before_any_parser(
    client: TestClient, db: Database, opening: str
) -> None:
    """Nesting costs two bytes a level: far under the size limit, thousands of levels once
    made the parser recurse into a RecursionError, a 500."""
    closing = "]" if opening == "[" else "}"
    before = snapshot(db)
    body = opening * 400 + "1" + closing * 400
    response = client.post(
        "/api/v1/searches", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body"] and "32 levels" in detail["msg"]
    # Brackets inside strings are not nesting: a name full of them is just a name.
    created = create(client, {**SPEC, "name": "[{" * 50 + '\\"'})
    assert created["name"].startswith("[{[{")
    assert len(snapshot(db)["searches"]) == len(before["searches"]) + 1


BEYOND_ANY_COLUMN = 2**70


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/searches?offset={big}",
        "/api/v1/searches/{search}/trials?offset={big}",
        "/api/v1/searches/{search}/trials/{big}",
        "/api/v1/searches/{search}/trials/0?attempt={big}",
        "/api/v1/searches/{search}/trials/{big}/files/weights.safetensors",
        "/api/v1/searches/{search}/trials/{big}/attention",
        "/api/v1/searches/{search}/leaderboard?offset={big}",
    ],
)
def test_integers_beyond_a_database_column_are_422(
    client: TestClient, search_id: str, path: str
) -> None:
    """A fuzzer's 2**70 once reached the database and overflowed there: a 500."""
    response = client.get(path.format(big=BEYOND_ANY_COLUMN, search=search_id))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] in ("offset", "number", "attempt")


def test_body_at_the_limit_is_accepted_declared_or_streamed(
    client: TestClient, db: Database
) -> None:
    headers = {"Content-Type": "application/json"}
    body = _padded(SPEC, MAX_BYTES)
    response = client.post("/api/v1/searches", content=body, headers=headers)
    assert response.status_code == 201, response.text

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    # The buffered chunks are replayed to the route intact.
    response = client.post("/api/v1/searches", content=chunks(), headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["name"] == SPEC["name"]
    assert counts(db)[0] == 2


# -- searches: happy paths -----------------------------------------------------------------------


def test_create_search_is_201_with_progress(client: TestClient, db: Database) -> None:
    before = counts(db)
    created = create(client, {**SPEC, "space": {"kernel_sizes": [3, 7]}})
    assert re.fullmatch(r"[0-9a-f]{32}", created["id"])
    assert created["state"] == "queued"
    assert created["name"] == SPEC["name"]
    assert created["budget_trials"] == 3
    # The spec is stored normalised, defaults filled in.
    expected = SearchSpec.from_dict({**SPEC, "space": {"kernel_sizes": [3, 7]}}).to_dict()
    assert created["spec"] == expected
    assert created["spec"]["backbone"] == BACKBONE
    assert created["progress"] == {
        "budget": 3,
        "done": 0,
        "completed": 0,
        "running": 0,
        "pruned": 0,
        "failed": 0,
        "over_budget": 0,
        "requeued": 0,
        "eta_s": None,
        "best": None,
        "confirmation": {
            "pending": 0,
            "running": 0,
            "completed": 0,
            "failed": 0,
            "requeued": 0,
        },
        "val_images": None,
        "noise_floor_pp": None,
    }
    assert created["started_at"] is None and created["finished_at"] is None
    assert created["error"] is None
    assert counts(db) == (before[0] + 1, before[1], before[2] + 1)
    names = {s.study_name for s in optuna.get_all_study_summaries(db.optuna_storage())}
    assert f"cbam-nas-{created['id']}" in names
    shown = client.get(f"/api/v1/searches/{created['id']}")
    assert shown.status_code == 200
    assert shown.json() == created


def test_idempotency_key(client: TestClient, db: Database) -> None:
    first = client.post("/api/v1/searches", json=SPEC, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201
    after_first = snapshot(db)
    # The same key and spec: the same search, nothing new.
    again = client.post("/api/v1/searches", json=SPEC, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    # The same spec written out with its defaults is the same spec.
    explicit = {**SPEC, "seed": 0, "sampler": "tpe", "backbone": BACKBONE}
    same = client.post("/api/v1/searches", json=explicit, headers={"Idempotency-Key": "k1"})
    assert same.status_code == 200
    assert same.json()["id"] == first.json()["id"]
    assert snapshot(db) == after_first
    assert counts(db)[0] == 1
    # The same key, another spec: 409, nothing stored.
    other = {**SPEC, "budget": {"trials": 4}}
    conflict = client.post("/api/v1/searches", json=other, headers={"Idempotency-Key": "k1"})
    assert conflict.status_code == 409
    assert "k1" in conflict.json()["detail"]
    assert snapshot(db) == after_first
    # Another key, or none: new searches.
    second = client.post("/api/v1/searches", json=SPEC, headers={"Idempotency-Key": "k2"})
    assert second.status_code == 201
    assert second.json()["id"] != first.json()["id"]
    assert create(client)["id"] not in (first.json()["id"], second.json()["id"])
    assert counts(db)[0] == 3


def test_list_searches_pages_newest_first_and_filters_by_state(
    client: TestClient, db: Database
) -> None:
    ids = [create(client, {**SPEC, "name": f"s{i}"})["id"] for i in range(4)]
    newest_first = ids[::-1]
    assert client.post(f"/api/v1/searches/{ids[1]}/cancel").status_code == 200

    page = client.get("/api/v1/searches").json()
    assert (page["total"], page["offset"], page["limit"]) == (4, 0, 50)
    assert [item["id"] for item in page["items"]] == newest_first
    assert all("progress" in item and item["progress"]["budget"] == 3 for item in page["items"])

    seen = []
    for offset in (0, 2, 4):
        page = client.get(f"/api/v1/searches?limit=2&offset={offset}").json()
        assert (page["total"], page["offset"], page["limit"]) == (4, offset, 2)
        seen += [item["id"] for item in page["items"]]
    assert seen == newest_first

    cancelled = client.get("/api/v1/searches?state=cancelled").json()
    assert cancelled["total"] == 1
    assert [item["id"] for item in cancelled["items"]] == [ids[1]]
    queued = client.get("/api/v1/searches?state=queued&limit=2").json()
    assert queued["total"] == 3
    assert [item["id"] for item in queued["items"]] == [ids[3], ids[2]]
    assert client.get("/api/v1/searches?state=running").json() == {
        "total": 0,
        "offset": 0,
        "limit": 50,
        "items": [],
    }


def test_cancel_then_delete(client: TestClient, db: Database) -> None:
    keep = create(client)["id"]
    search_id = create(client)["id"]
    with db.session() as session:
        session.add(_row(search_id, 0, "completed", "none", ARCH["none"], 0.9, 272_474, 1.0))
        session.add(_row(keep, 0, "completed", "none", ARCH["none"], 0.9, 272_474, 1.0))
    cancelled = client.post(f"/api/v1/searches/{search_id}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["id"] == search_id
    assert body["state"] == "cancelled"
    assert body["finished_at"] is not None
    assert body["progress"]["completed"] == 1
    assert client.get(f"/api/v1/searches/{search_id}").json()["state"] == "cancelled"

    before = counts(db)
    deleted = client.delete(f"/api/v1/searches/{search_id}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert client.get(f"/api/v1/searches/{search_id}").status_code == 404
    assert client.get(f"/api/v1/searches/{search_id}/trials").status_code == 404
    assert client.delete(f"/api/v1/searches/{search_id}").status_code == 404
    assert counts(db) == (before[0] - 1, before[1] - 1, before[2] - 1)
    names = {s.study_name for s in optuna.get_all_study_summaries(db.optuna_storage())}
    assert f"cbam-nas-{search_id}" not in names
    assert f"cbam-nas-{keep}" in names
    assert client.get(f"/api/v1/searches/{keep}/trials").json()["total"] == 1


# -- trials, leaderboard, best -------------------------------------------------------------------


ARCH = reference_architectures(BACKBONE)
BASE = {"params": 272_474, "macs": 41_000_000, "latency_ms": 1.0}


def _cbam(**knobs: Any) -> Architecture:
    return Architecture(BACKBONE, "cbam", **knobs)


def _pct(value: float | None, base: float) -> float | None:
    return None if value is None else 100.0 * (value - base) / base


def _row(
    search_id: str,
    number: int,
    state: str,
    reference: str | None,
    architecture: Architecture,
    accuracy: float | None,
    params: int | None,
    latency_ms: float | None,
    attempt: int = 0,
) -> TrialResult:
    macs = None if params is None else params * 150
    curve = [
        {"epoch": epoch, "val_accuracy": round((accuracy or 0.2) * epoch / 3, 4), "train_loss": 1}
        for epoch in (1, 2, 3)
    ]
    return TrialResult(
        search_id=search_id,
        number=number,
        attempt=attempt,
        state=ResultState(state),
        reference=None if reference is None else Reference(reference),
        architecture=architecture.to_dict(),
        arch_id=architecture.id,
        label=architecture.describe(),
        val_accuracy=accuracy,
        final_val_accuracy=accuracy,
        params=params,
        macs=macs,
        latency_ms=latency_ms,
        params_pct=_pct(params, BASE["params"]),
        macs_pct=_pct(macs, BASE["params"] * 150),
        latency_pct=_pct(latency_ms, BASE["latency_ms"]),
        epochs_run=3,
        learning_curve=curve,
        finished_at=None if state == "running" else utcnow(),
    )


# number, state, reference, architecture, val_accuracy, params, latency_ms[, attempt]
TRIALS: list[tuple[Any, ...]] = [
    (0, "completed", "none", ARCH["none"], 0.900, 272_474, 1.00),
    (1, "completed", "se", ARCH["se"], 0.910, 276_000, 1.30),
    (2, "completed", "cbam", ARCH["cbam"], 0.920, 278_000, 1.60),
    (3, "completed", None, _cbam(kernel_size=3), 0.930, 277_000, 1.50),
    (4, "completed", None, _cbam(arrangement="channel"), 0.915, 274_000, None),
    (5, "pruned", None, _cbam(kernel_size=5), 0.500, 275_000, 1.20),
    (6, "failed", None, _cbam(kernel_size=9), None, None, None),
    (7, "completed", None, _cbam(blocks="last"), 0.890, 273_000, 0.90),
    (8, "completed", None, _cbam(arrangement="spatial"), 0.930, 280_000, 1.40),
    (9, "requeued", None, _cbam(reduction=4), None, None, None, 0),
    # Running, so never ranked, although it is below every budget.
    (9, "running", None, _cbam(reduction=4), 0.600, 269_000, 0.80, 1),
]
COMPLETED = [t for t in TRIALS if t[1] == "completed"]


@pytest.fixture
def search_id(client: TestClient, db: Database) -> str:
    search_id = create(client, {**SPEC, "budget": {"trials": 12}})["id"]
    with db.session() as session:
        for number, state, reference, arch, accuracy, params, latency, *attempt in TRIALS:
            row = _row(search_id, number, state, reference, arch, accuracy, params, latency)
            row.attempt = attempt[0] if attempt else 0
            session.add(row)
    return search_id


def _key(item: dict[str, Any]) -> tuple[int, int]:
    return item["number"], item["attempt"]


def test_progress_counts_the_trial_rows(client: TestClient, search_id: str) -> None:
    progress = client.get(f"/api/v1/searches/{search_id}").json()["progress"]
    assert progress["budget"] == 12
    assert progress["done"] == 9  # slots 0..8 finished
    assert (progress["completed"], progress["pruned"], progress["failed"]) == (7, 1, 1)
    assert (progress["running"], progress["requeued"], progress["over_budget"]) == (1, 1, 0)
    assert progress["best"]["number"] == 3
    assert progress["best"]["val_accuracy"] == pytest.approx(0.93)


def test_trials_page_and_sorting(client: TestClient, search_id: str) -> None:
    url = f"/api/v1/searches/{search_id}/trials"
    page = client.get(url).json()
    assert (page["total"], page["offset"], page["limit"]) == (len(TRIALS), 0, 50)
    assert [_key(item) for item in page["items"]] == [(t[0], (t[7:] or (0,))[0]) for t in TRIALS]
    assert all("learning_curve" not in item and "artifacts" not in item for item in page["items"])

    page = client.get(f"{url}?limit=4&offset=8").json()
    assert page["total"] == len(TRIALS)
    assert [_key(item) for item in page["items"]] == [(8, 0), (9, 0), (9, 1)]

    by_accuracy = client.get(f"{url}?sort=val_accuracy&order=desc&limit=1000").json()["items"]
    assert [_key(item) for item in by_accuracy] == [
        (3, 0), (8, 0), (2, 0), (4, 0), (1, 0), (0, 0), (7, 0), (9, 1), (5, 0), (6, 0), (9, 0),
    ]  # fmt: skip
    values = [item["val_accuracy"] for item in by_accuracy]
    present = [v for v in values if v is not None]
    assert present == sorted(present, reverse=True)
    assert values[len(present) :] == [None] * (len(values) - len(present))

    by_params = client.get(f"{url}?sort=params&order=asc").json()["items"]
    assert [item["params"] for item in by_params] == [
        269_000, 272_474, 273_000, 274_000, 275_000, 276_000, 277_000, 278_000, 280_000, None, None,
    ]  # fmt: skip
    by_params_desc = client.get(f"{url}?sort=params&order=desc").json()["items"]
    assert [item["params"] for item in by_params_desc][-2:] == [None, None]
    assert by_params_desc[0]["params"] == 280_000

    completed = client.get(f"{url}?state=completed&sort=params").json()
    assert completed["total"] == len(COMPLETED)
    assert {item["state"] for item in completed["items"]} == {"completed"}
    assert [item["number"] for item in completed["items"]] == [0, 7, 4, 1, 3, 2, 8]


def test_invalid_trial_queries_are_422(client: TestClient, search_id: str) -> None:
    url = f"/api/v1/searches/{search_id}/trials"
    response = client.get(f"{url}?sort=accuracy")
    assert response.status_code == 422
    message = json.dumps(response.json()["detail"])
    for allowed in ("val_accuracy", "params", "latency_ms", "number"):
        assert allowed in message
    for query in ("order=sideways", "state=done", "limit=0", "limit=1001", "offset=-1"):
        assert client.get(f"{url}?{query}").status_code == 422, query
    for path in ("leaderboard", "best"):
        response = client.get(f"/api/v1/searches/{search_id}/{path}?overhead=energy")
        assert response.status_code == 422
        message = json.dumps(response.json()["detail"])
        assert all(name in message for name in ("params", "macs", "latency"))


def test_one_trial_in_full(client: TestClient, search_id: str) -> None:
    url = f"/api/v1/searches/{search_id}/trials"
    trial = client.get(f"{url}/3").json()
    architecture = _cbam(kernel_size=3)
    assert trial["architecture"] == architecture.to_dict()
    assert trial["arch_id"] == architecture.id
    assert trial["label"] == architecture.describe()
    assert [point["epoch"] for point in trial["learning_curve"]] == [1, 2, 3]
    assert trial["learning_curve"][-1]["val_accuracy"] == pytest.approx(0.93)
    assert trial["val_accuracy"] == pytest.approx(0.93)
    assert trial["params"] == 277_000
    assert trial["files"] == []
    assert client.get(f"{url}/0").json()["reference"] == "none"
    # The latest attempt, unless one is asked for.
    assert _key(client.get(f"{url}/9").json()) == (9, 1)
    assert client.get(f"{url}/9?attempt=0").json()["state"] == "requeued"
    assert client.get(f"{url}/9?attempt=5").status_code == 404
    assert client.get(f"{url}/99").status_code == 404
    assert client.get(f"{url}/9?attempt=-1").status_code == 422
    assert client.get(f"{url}/three").status_code == 422


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, overhead): higher accuracy and lower overhead are better."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def _brute_force_front(overhead_index: int) -> set[int]:
    points = {
        t[0]: (t[4], float("inf") if t[overhead_index] is None else t[overhead_index])
        for t in COMPLETED
    }
    return {
        n
        for n, p in points.items()
        if not any(_dominates(q, p) for m, q in points.items() if m != n)
    }


def test_leaderboard(client: TestClient, search_id: str) -> None:
    url = f"/api/v1/searches/{search_id}/leaderboard"
    board = client.get(f"{url}?limit=1000").json()
    assert board["search_id"] == search_id
    assert board["overhead"] == "params"
    assert board["total"] == len(COMPLETED)
    entries = board["entries"]
    # Completed rows only, best accuracy first (ties: fewer parameters).
    assert [e["number"] for e in entries] == [3, 8, 2, 4, 1, 0, 7]
    assert [e["rank"] for e in entries] == list(range(1, len(COMPLETED) + 1))
    assert all(e["state"] == "completed" for e in entries)
    # No split size recorded: no noise floor, so no say on whether the page is within it.
    spread = 100 * (entries[0]["val_accuracy_mean"] - entries[-1]["val_accuracy_mean"])
    assert board["spread_pp"] == pytest.approx(spread) and board["within_noise"] is None
    # The Pareto flags against a brute-force dominance check.
    front = _brute_force_front(5)
    assert front == {3, 4, 0}
    assert {e["number"] for e in entries if e["pareto"]} == front
    # The references: the three, with their figures.
    references = board["references"]
    assert set(references) == {"none", "se", "cbam"}
    assert {name: ref["number"] for name, ref in references.items()} == {
        "none": 0,
        "se": 1,
        "cbam": 2,
    }
    assert references["se"]["params"] == 276_000
    # Deltas: accuracy in points, the overhead in percent.
    by_number = {t[0]: t for t in COMPLETED}
    for entry in entries:
        _, _, _, _, accuracy, params, _ = by_number[entry["number"]]
        assert entry["val_accuracy"] == pytest.approx(accuracy)
        for name, (_, _, _, _, ref_accuracy, ref_params, _) in (
            ("none", by_number[0]),
            ("se", by_number[1]),
            ("cbam", by_number[2]),
        ):
            assert entry[f"delta_vs_{name}"] == pytest.approx(100 * (accuracy - ref_accuracy))
            assert entry[f"params_delta_vs_{name}"] == pytest.approx(
                100 * (params - ref_params) / ref_params
            )
    top = entries[0]
    assert top["delta_vs_none"] == pytest.approx(3.0)
    assert top["delta_vs_cbam"] == pytest.approx(1.0)
    assert top["params_delta_vs_se"] == pytest.approx(100 * 1_000 / 276_000)
    assert "learning_curve" not in top

    # Against latency the front is another one; a missing latency is worse than any.
    by_latency = client.get(f"{url}?overhead=latency").json()
    assert by_latency["overhead"] == "latency"
    latency_front = _brute_force_front(6)
    assert latency_front == {8, 1, 0, 7}
    assert {e["number"] for e in by_latency["entries"] if e["pareto"]} == latency_front
    assert [e["number"] for e in by_latency["entries"]] == [3, 8, 2, 4, 1, 0, 7]
    row_3 = by_latency["entries"][0]
    assert row_3["latency_delta_vs_se"] == pytest.approx(100 * (1.5 - 1.3) / 1.3)
    assert "params_delta_vs_se" not in row_3
    row_4 = next(e for e in by_latency["entries"] if e["number"] == 4)
    assert row_4["latency_delta_vs_none"] is None

    # Pages and the front only.
    page = client.get(f"{url}?limit=2&offset=2").json()
    assert page["total"] == len(COMPLETED)
    assert [e["number"] for e in page["entries"]] == [2, 4]
    assert [e["rank"] for e in page["entries"]] == [3, 4]
    only = client.get(f"{url}?pareto_only=true").json()
    assert only["total"] == len(front)
    assert [e["number"] for e in only["entries"]] == [3, 4, 0]


def test_best(client: TestClient, search_id: str) -> None:
    url = f"/api/v1/searches/{search_id}/best"
    best = client.get(url).json()
    assert best["number"] == 3
    assert best["architecture"] == _cbam(kernel_size=3).to_dict()
    assert "learning_curve" in best
    # Within 1% more parameters than no attention: 0, 7 and 4 fit; 4 is the most accurate.
    within = client.get(f"{url}?max_pct=1").json()
    assert within["number"] == 4
    assert within["params_pct"] <= 1
    # Within 35% more latency: 0, 1 and 7 fit.
    assert client.get(f"{url}?overhead=latency&max_pct=35").json()["number"] == 1
    # Nothing completed fits (the running attempt at -1.3% does not count).
    none_fits = client.get(f"{url}?max_pct=-1")
    assert none_fits.status_code == 404
    assert "-1%" in none_fits.json()["detail"]
    assert client.get(f"{url}?max_pct=lots").status_code == 422


def test_best_of_a_search_without_results_is_404(client: TestClient) -> None:
    search_id = create(client)["id"]
    assert client.get(f"/api/v1/searches/{search_id}/best").status_code == 404
    board = client.get(f"/api/v1/searches/{search_id}/leaderboard").json()
    assert (board["total"], board["entries"], board["references"]) == (0, [], {})


def test_files_of_a_trial_without_artifacts_are_409(
    client: TestClient, db: Database, search_id: str
) -> None:
    url = f"/api/v1/searches/{search_id}/trials"
    before = snapshot(db)
    for number, name in ((3, "weights.safetensors"), (6, "metrics.json"), (3, "model.onnx")):
        response = client.get(f"{url}/{number}/files/{name}")
        assert response.status_code == 409, (number, name, response.text)
        assert "only completed trials have files" in response.json()["detail"]
    assert client.get(f"{url}/99/files/weights.safetensors").status_code == 404
    assert client.get(f"{url}/3/files/secrets.txt").status_code == 422
    assert snapshot(db) == before


# -- operations ----------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, list[Any]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics(client: TestClient, db: Database) -> None:
    ids = [create(client)["id"] for _ in range(3)]
    client.post(f"/api/v1/searches/{ids[0]}/cancel")
    client.get(f"/api/v1/searches/{ids[1]}")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'cbam_nas_searches{state="queued"} 2.0' in response.text
    families = _samples(response.text)
    searches = {s.labels["state"]: s.value for s in families["cbam_nas_searches"]}
    assert searches == {"queued": 2, "running": 0, "completed": 0, "cancelled": 1, "failed": 0}
    assert "cbam_nas_trials" in families
    assert "cbam_nas_workers_seen" in families
    # The request-latency histogram: by method, route template and status.
    latency = families["cbam_nas_request_seconds"]
    counted = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in latency
        if s.name == "cbam_nas_request_seconds_count"
    }
    posts = [v for (m, r, st), v in counted.items() if m == "POST" and r.endswith("/searches")]
    assert posts == [3]
    shown = [(r, v) for (m, r, st), v in counted.items() if m == "GET" and st == "200"]
    assert any(r.endswith("/searches/{search_id}") and v == 1 for r, v in shown), counted
    assert not any(ids[1] in route for _, route, _ in counted)  # templates, not paths
    buckets = [s for s in latency if s.name == "cbam_nas_request_seconds_bucket"]
    assert buckets and {s.labels["le"] for s in buckets} >= {"0.005", "1.0", "+Inf"}


def test_metrics_route_label_is_the_full_template(client: TestClient) -> None:
    search_id = create(client)["id"]
    client.get(f"/api/v1/searches/{search_id}")
    routes = {
        s.labels["route"] for s in _samples(client.get("/metrics").text)["cbam_nas_request_seconds"]
    }
    assert {"/api/v1/searches", "/api/v1/searches/{search_id}"} <= routes


def test_readyz(client: TestClient, db: Database) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": db.dialect,
        "schema": db.head_revision(),
    }
    assert db.current_revision() == db.head_revision()
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_503_before_migration(app_settings: Settings, tmp_path: Any) -> None:
    fresh = open_database(f"sqlite:///{tmp_path / 'fresh' / 'unmigrated.db'}")
    try:
        with TestClient(create_app(app_settings, db=fresh)) as unmigrated:
            response = unmigrated.get("/readyz")
            assert response.status_code == 503
            assert response.json()["status"] == "unavailable"
            assert unmigrated.get("/healthz").status_code == 200
    finally:
        fresh.close()
