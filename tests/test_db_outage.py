"""Database outages: which errors are retried, how, and a PostgreSQL restart in the middle of a
search that two worker processes ride out.

The end-to-end test starts a PostgreSQL server of its own (``scripts/postgres.sh`` with its own
directory and port), so that stopping it leaves the other tests' server alone. Without
PostgreSQL's binaries it is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import glob
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import psycopg
import psycopg.errors
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool
from support import free_port, quick_spec, wait_until

from search.store.engine import Database, Outage, is_transient, open_database, retrying
from search.store.models import ResultState, Search, SearchState, TrialResult, WorkerSeen, utcnow
from search.store.searches import create_search, search_study
from workers.queue import claim_trial, sweep_lost

ROOT = Path(__file__).resolve().parent.parent
OUTAGE_S = 20.0
# Shorter than the outage (heartbeats missed during it must not count), yet long enough that a
# worker starved of CPU on a loaded CI machine still beats within it once the server is back.
GRACE_S = 14.0


# -- which errors are transient ----------------------------------------------------------------


def _wrapped(cls: type[sa_exc.DBAPIError], orig: BaseException, **kwargs: Any) -> Exception:
    return cls("SELECT 1", {}, orig, **kwargs)  # type: ignore[arg-type]


def _storage_error(cause: BaseException) -> optuna.exceptions.StorageInternalError:
    try:
        raise optuna.exceptions.StorageInternalError("commit failed") from cause
    except optuna.exceptions.StorageInternalError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_wrapped(sa_exc.OperationalError, sqlite3.OperationalError("database is locked")), True),
        (_wrapped(sa_exc.OperationalError, sqlite3.OperationalError("no such table: x")), False),
        (_wrapped(sa_exc.IntegrityError, sqlite3.IntegrityError("UNIQUE failed")), False),
        (_wrapped(sa_exc.OperationalError, psycopg.OperationalError("connection refused")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.AdminShutdown("terminating")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.CannotConnectNow("starting up")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.SerializationFailure("retry")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.ProgramLimitExceeded("big")), False),
        (_wrapped(sa_exc.InterfaceError, psycopg.InterfaceError("connection is closed")), True),
        (_wrapped(sa_exc.ProgrammingError, psycopg.errors.UndefinedTable("no table")), False),
        (_wrapped(sa_exc.DBAPIError, Exception("gone"), connection_invalidated=True), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (_storage_error(_wrapped(sa_exc.OperationalError, psycopg.OperationalError("x"))), True),
        (_storage_error(ValueError("too long")), False),
        (ValueError("not a database error"), False),
    ],
)
def test_transient_errors_are_told_apart(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


# -- the retry helper --------------------------------------------------------------------------


class _FakeTime:
    """A clock that only the helper's own sleeps move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_retrying_backs_off_with_jitter_and_gives_up_after_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, calls = _FakeTime(), []

    def down() -> None:
        calls.append(fake.now)
        raise _wrapped(sa_exc.OperationalError, psycopg.OperationalError("connection refused"))

    with caplog.at_level(logging.WARNING, "cbam_nas.db"), pytest.raises(sa_exc.OperationalError):
        retrying(down, what="test", deadline_s=60, sleep=fake.sleep, clock=fake.clock)
    # 0.5 s doubling to 10 s, each wait in the upper half of its step; then the deadline.
    steps = [0.5, 1, 2, 4, 8] + [10] * 20
    for waited, step in zip(fake.sleeps[:-1], steps, strict=False):
        assert step / 2 <= waited <= step
    assert sum(fake.sleeps) == pytest.approx(60) and calls[-1] == pytest.approx(60)
    assert len(calls) == len(fake.sleeps) + 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unavailable (test), retrying for up to 60 s" in m for m in messages) == 1
    assert any("giving up" in m for m in messages)


def test_retrying_raises_other_errors_at_once(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}", poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        connection.execute(text("INSERT INTO t VALUES (1)"))
    calls = []

    def duplicate() -> None:
        calls.append(1)
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (1)"))

    with pytest.raises(sa_exc.IntegrityError):
        retrying(duplicate, what="test", deadline_s=60, sleep=lambda _s: None)
    assert calls == [1]


def test_retrying_waits_out_a_locked_sqlite_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "locked.db"
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05}, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.6, holder.rollback)
    release.start()

    def insert() -> int:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (7)"))
            return connection.scalar(text("SELECT count(*) FROM t"))

    outage = Outage()
    try:
        with caplog.at_level(logging.WARNING, "cbam_nas.db"):
            assert retrying(insert, what="insert", deadline_s=30, outage=outage) == 1
    finally:
        release.join()
        holder.close()
    assert outage.count == 1 and not outage.down and outage.within(60)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("database unavailable (insert)") for m in messages) == 1
    assert sum(m.startswith("database available again") for m in messages) == 1


def test_no_sweep_within_a_grace_period_of_an_outage(sqlite_db: Database) -> None:
    search = create_search(sqlite_db, quick_spec(trials=1))
    claim = claim_trial(sqlite_db, "a", "cpu", search.id)
    with sqlite_db.session() as session:
        session.execute(
            update(TrialResult)
            .where(TrialResult.id == claim.row_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
    sqlite_db.outage.failed("test", RuntimeError("down"))
    assert sweep_lost(sqlite_db, 0.3) == []  # the database is down as far as we know
    sqlite_db.outage.ok()
    assert sweep_lost(sqlite_db, 0.3) == []  # back, but not for a grace period yet
    time.sleep(0.35)
    assert sweep_lost(sqlite_db, 0.3) == [claim.row_id]


@pytest.mark.parametrize(("role", "ours", "optunas"), [("worker", 2, 2), ("api", 10, 2)])
def test_pools_are_sized_per_role(role: str, ours: int, optunas: int) -> None:
    # Nothing listens there: engines connect lazily, so the pools can be read without a server.
    db = Database("postgresql://u:p@127.0.0.1:9/x", role=role)  # type: ignore[arg-type]
    optuna_kwargs = db._engine_kwargs(optuna=True)
    assert db.engine.pool.size() == ours and optuna_kwargs["pool_size"] == optunas
    assert db.engine.pool._pre_ping and db.engine.pool._recycle == 1800
    assert optuna_kwargs["pool_pre_ping"] and optuna_kwargs["pool_recycle"] == 1800
    assert optuna_kwargs["connect_args"] == {"connect_timeout": 10}
    db.close()
    with pytest.raises(ValueError, match="role"):
        Database("sqlite://", role="batch")  # type: ignore[arg-type]


# -- a PostgreSQL restart during a search --------------------------------------------------------


class _Server:
    """A PostgreSQL server of this test's own, through scripts/postgres.sh."""

    def __init__(self) -> None:
        # Directly under the system temp dir: the postgres user (when we are root) must reach it.
        self.env = {
            **os.environ,
            "PGTMP": tempfile.mkdtemp(prefix="cbam-nas-pg-outage-"),
            "PGPORT_CI": str(free_port(55480)),
        }

    def __call__(self, command: str) -> str:
        done = subprocess.run(
            [str(ROOT / "scripts" / "postgres.sh"), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"postgres.sh {command} failed:\n{done.stderr}")
        return done.stdout.strip()


@pytest.fixture
def server() -> Iterator[_Server]:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        reason = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (.ci/run)")
        pytest.skip(reason)
    server = _Server()
    try:
        yield server
    finally:
        server("stop")


@pytest.mark.e2e
def test_workers_ride_out_a_postgresql_restart(server: _Server, tmp_path: Path) -> None:
    url = server("start").splitlines()[-1]
    db = open_database(url)
    db.migrate()
    budget, epochs = 4, 3
    search = create_search(db, quick_spec(trials=budget, epochs=epochs))
    command = [sys.executable, "-m", "service.cli", "worker", "--database", url]
    command += ["--artifacts", str(tmp_path / "artifacts"), "--search", search.id]
    command += ["--no-progress", "--grace-period", str(GRACE_S), "--heartbeat-interval", "0.5"]
    command += ["--poll-interval", "0.2", "--latency-repeats", "1", "--threads", "1"]
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = []
    for i, log in enumerate(logs):
        with log.open("wb") as out:
            workers.append(
                subprocess.Popen(
                    [*command, "--name", f"w{i}"], cwd=ROOT, env=env, stdout=out, stderr=out
                )
            )

    def tail() -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)

    def mid_trial() -> TrialResult | None:
        with db.session() as session:
            seen = set(session.scalars(select(WorkerSeen.id)).all())
            row = session.scalars(
                select(TrialResult).where(
                    TrialResult.search_id == search.id,
                    TrialResult.state == ResultState.running,
                    TrialResult.epochs_run >= 1,
                    TrialResult.epochs_run < epochs,
                )
            ).first()
        return row if {"w0", "w1"} <= seen else None

    try:
        # Both workers past their start, one of them between two epochs of a trial.
        interrupted = wait_until(mid_trial, "a trial between two epochs", 60)
        db.close()
        server("halt")
        stopped = time.monotonic()
        time.sleep(OUTAGE_S)
        assert [w.poll() for w in workers] == [None, None], tail()
        server("start")
        outage_s = time.monotonic() - stopped
        # The server has just started: nobody may sweep yet, whatever the heartbeats say.
        assert not db.available_for(GRACE_S)
        assert [w.poll() for w in workers] == [None, None], tail()
        codes = [w.wait(timeout=90) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert codes == [0, 0], tail()

    with db.session() as session:
        assert session.get(Search, search.id).state == SearchState.completed
        rows = session.scalars(
            select(TrialResult)
            .where(TrialResult.search_id == search.id)
            .order_by(TrialResult.number, TrialResult.attempt)
        ).all()
    # Nothing lost, nothing run twice: every slot once, in its first attempt.
    assert [(r.number, r.attempt, r.state) for r in rows] == [
        (n, 0, ResultState.completed) for n in range(budget)
    ], ([(r.number, r.attempt, r.state, r.failure_reason) for r in rows], tail())
    resumed = next(r for r in rows if r.id == interrupted.id)
    assert resumed.epochs_run == epochs and resumed.worker == interrupted.worker
    study = search_study(db, search.study_name)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * budget
    for log in logs:
        text_ = log.read_text()
        assert "database unavailable" in text_ and "database available again" in text_, tail()
    assert outage_s >= OUTAGE_S
    db.close()


def test_an_unreachable_storage_proxy_is_transient() -> None:
    grpc = pytest.importorskip("grpc")

    class ProxyError(grpc.RpcError):
        def __init__(self, code: object) -> None:
            self._code = code

        def code(self) -> object:
            return self._code

    assert is_transient(ProxyError(grpc.StatusCode.UNAVAILABLE))
    assert is_transient(ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not is_transient(ProxyError(grpc.StatusCode.INVALID_ARGUMENT))
