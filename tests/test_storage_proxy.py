"""Optuna's gRPC storage proxy in front of our database (``cbam-nas storage-proxy``).

A worker started with ``CBAM_NAS_OPTUNA_STORAGE_URL=grpc://...`` before the proxy is up claims a
trial (our tables: the database directly) and then waits for the proxy instead of touching the
study; once the proxy runs, it finishes the search, and the study read through the proxy and the
one read from the database agree. Skipped without grpcio (``pip install 'cbam-nas[proxy]'``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, quick_spec, wait_until

pytest.importorskip("grpc")

import optuna
from optuna.trial import TrialState
from sqlalchemy import select

from search.errors import InvalidValue
from search.store.engine import Database, grpc_address, open_database
from search.store.models import ResultState, Search, SearchState, TrialResult
from search.store.searches import create_search

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180


def _cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=out,
            stderr=out,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rows(db: Database, search_id: str) -> list[TrialResult]:
    with db.session() as session:
        query = select(TrialResult).where(TrialResult.search_id == search_id)
        return list(session.scalars(query.order_by(TrialResult.number)).all())


@pytest.fixture
def direct_db(database_url: str) -> Iterator[Database]:
    """The test's database, migrated, with Optuna on the database itself (no proxy)."""
    db = open_database(database_url)
    db.migrate()
    assert db.optuna_proxy is None
    yield db
    db.close()


def _summary(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[Any, ...]]:
    return [(t.number, t.state, t.params, t.values, t.user_attrs, t.system_attrs) for t in trials]


@pytest.mark.e2e
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the proxy's setting
def test_worker_runs_a_search_through_the_proxy(
    direct_db: Database, database_url: str, tmp_path: Path
) -> None:
    search = create_search(direct_db, quick_spec(epochs=1, samples=128, sampler="tpe"))
    port = free_port()
    grpc_url = f"grpc://127.0.0.1:{port}"
    log = tmp_path / "processes.log"
    worker_args = ["worker", "--search", search.id, "--grace-period", "60"]
    worker_args += ["--heartbeat-interval", "0.5", "--poll-interval", "0.2"]
    worker_args += ["--latency-repeats", "1", "--threads", "1", "--no-progress"]
    worker = _cli(*worker_args, log=log, env={"CBAM_NAS_OPTUNA_STORAGE_URL": grpc_url})
    proxy = None
    try:
        # No proxy yet: the worker claims a slot (our tables, directly) but cannot ask the study.
        wait_until(lambda: _rows(direct_db, search.id), "the worker's first claim", TIMEOUT_S, log)
        time.sleep(2.0)
        assert worker.poll() is None, log.read_text()[-3000:]
        study = optuna.load_study(study_name=search.study_name, storage=direct_db.rdb_storage())
        assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 3  # references
        assert all(r.optuna_number is None for r in _rows(direct_db, search.id))

        proxy_args = ["storage-proxy", "--host", "127.0.0.1", "--port", str(port)]
        proxy = _cli(*proxy_args, "--database", database_url, log=log)
        assert worker.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
        assert proxy.poll() is None, log.read_text()[-3000:]

        rows = _rows(direct_db, search.id)
        assert [(r.number, r.state) for r in rows] == [(n, ResultState.completed) for n in range(4)]
        with direct_db.session() as session:
            assert session.get(Search, search.id).state == SearchState.completed

        direct = optuna.load_study(study_name=search.study_name, storage=direct_db.rdb_storage())
        proxied_db = open_database(database_url, optuna_storage_url=grpc_url)
        try:
            proxied = optuna.load_study(
                study_name=search.study_name, storage=proxied_db.optuna_storage()
            )
            assert type(proxied._storage).__name__ == "WaitingGrpcStorageProxy"
            assert _summary(proxied.get_trials()) == _summary(direct.get_trials())
        finally:
            proxied_db.close()
        assert [t.state for t in direct.get_trials()] == [TrialState.COMPLETE] * 4
        assert sorted(r.optuna_number for r in rows) == [0, 1, 2, 3]
        trials = {t.number: t for t in direct.get_trials()}
        for row in rows:
            assert row.artifacts == trials[row.optuna_number].user_attrs["artifacts"]
    finally:
        _stop(worker)
        if proxy is not None:
            _stop(proxy)


def test_settings_name_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.settings import get_settings

    monkeypatch.setenv("CBAM_NAS_OPTUNA_STORAGE_URL", "grpc://proxy.example:14000")
    get_settings.cache_clear()
    db = open_database()
    try:
        assert db.optuna_proxy == ("proxy.example", 14000)
        with pytest.raises(ValueError, match="heartbeat"):
            db.optuna_storage(heartbeat_interval=10)
    finally:
        db.close()


@pytest.mark.parametrize(
    ("url", "address"),
    [("grpc://h:1", ("h", 1)), ("grpc://h", ("h", 13000)), ("grpc://[::1]:5/", ("::1", 5))],
)
def test_grpc_address(url: str, address: tuple[str, int]) -> None:
    assert grpc_address(url) == address


@pytest.mark.parametrize("url", ["http://h:1", "grpc://:1", "grpc://h:x", "grpc://h:1/db"])
def test_bad_proxy_url_names_the_setting(url: str) -> None:
    with pytest.raises(InvalidValue, match="optuna_storage_url"):
        grpc_address(url)


def test_proxy_url_without_grpcio_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "grpc" else find_spec(name, *a),
    )
    with pytest.raises(InvalidValue, match=r"grpcio is not installed"):
        open_database(f"sqlite:///{tmp_path / 'x.db'}", optuna_storage_url="grpc://h:1")
