"""Shared fixtures: every test gets its own state directory, never the checkout's ./.cbam-nas.

Databases: ``database_url`` gives each test a fresh, empty database, once on SQLite and once on
PostgreSQL (``-k sqlite`` / ``-k postgresql`` pick one). PostgreSQL is the server named by
``CBAM_NAS_TEST_DATABASE_URL`` (its role needs CREATEDB), else a throwaway server started with
``scripts/postgres.sh`` for the session (port ``CBAM_NAS_TEST_PG_PORT``, else the first free
one from 55439). Without PostgreSQL's binaries those tests are skipped, except under CI: they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from support import SERVED_SPEC, Served, free_port, run_search, start_serve, stop_serve

from search.settings import Settings, get_settings
from search.store.engine import VERSION_TABLE, Database, normalise_url, open_database

ROOT = Path(__file__).resolve().parent.parent
PG_DEFAULT_PORT = 55439


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The process-level tests first, in their files' order: pytest-xdist's work stealing then
    ends a run on short tests, instead of one process finishing a 40 s test alone."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the whole run: datasets are read-only once prepared."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def settings(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Point the settings at a fresh SQLite file and artifact directory under tmp_path.

    Request it by name to read the values; a test that needs other values sets CBAM_NAS_*
    with monkeypatch and calls ``get_settings.cache_clear()``.
    """
    state = tmp_path / "cbam-nas"
    monkeypatch.setenv("CBAM_NAS_DATABASE_URL", f"sqlite:///{state / 'cbam-nas.db'}")
    monkeypatch.setenv("CBAM_NAS_ARTIFACTS_DIR", str(state / "artifacts"))
    monkeypatch.setenv("CBAM_NAS_CACHE_DIR", str(state / "cache"))
    monkeypatch.setenv("CBAM_NAS_TOKEN_FILE", str(state / "token"))
    monkeypatch.delenv("CBAM_NAS_TOKEN", raising=False)
    monkeypatch.delenv("CBAM_NAS_API_URL", raising=False)
    monkeypatch.setenv("CBAM_NAS_DATA_DIR", str(shared_data_dir))
    monkeypatch.delenv("CBAM_NAS_DATA_ROOTS", raising=False)
    monkeypatch.delenv("CBAM_NAS_ALLOW_DOWNLOADS", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL database for this session (see the module docstring)."""
    url = os.environ.get("CBAM_NAS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        reason = (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin): apt-get install postgresql"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (.ci/run)")
        pytest.skip(reason)
    # Under pytest-xdist each worker process starts its own server, from its own block of ports.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = PG_DEFAULT_PORT + 10 * (int(worker) if worker.isdigit() else 0)
    port = os.environ.get("CBAM_NAS_TEST_PG_PORT") or str(free_port(first))
    # Directly under the system temp dir: the server (the postgres user when we are root) must
    # reach it, and its socket path must stay short.
    pgtmp = tempfile.mkdtemp(prefix="cbam-nas-pg-")
    env = {**os.environ, "PGTMP": pgtmp, "PGPORT_CI": port}
    script = [str(ROOT / "scripts" / "postgres.sh")]
    try:
        started = subprocess.run(
            [*script, "start"], env=env, capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            pytest.fail(f"scripts/postgres.sh start failed:\n{started.stderr}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)


def _drop(admin: Engine, name: str) -> None:
    """Drop a test database; a refusal (a server that lets our role end no session but its own,
    with autovacuum in the database) leaves it to the throwaway server's end."""
    for attempt in range(3):
        try:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except DBAPIError as error:
            if attempt == 2:
                warnings.warn(f"test database {name} not dropped: {error}", stacklevel=2)
            time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres_admin(postgres_url: str) -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the session's PostgreSQL, for creating and dropping databases."""
    admin = create_engine(
        normalise_url(postgres_url), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    yield admin
    admin.dispose()


def _postgres_database(admin: Engine, template: str | None = None) -> tuple[str, str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as connection:
        clause = f' TEMPLATE "{template}"' if template else ""
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"{clause}')
    return name, admin.url.set(database=name).render_as_string(hide_password=False)


def _migrate(url: str) -> None:
    """Our tables and Optuna's, as ``Database.migrate()`` and the first study make them."""
    with open_database(url) as database:
        database.migrate()
        database.optuna_storage()
        assert database.current_revision() == database.head_revision()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that tests copy instead of migrating their own (0.4 s each)."""
    path = tmp_path_factory.mktemp("template") / "cbam-nas.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_admin: Engine) -> Iterator[str]:
    """A migrated PostgreSQL database that tests' databases are created from. It takes no
    connections, so that ``CREATE DATABASE ... TEMPLATE`` never finds it in use."""
    name, url = _postgres_database(postgres_admin)
    _migrate(url)
    with postgres_admin.connect() as connection:
        connection.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    yield name
    with postgres_admin.connect() as connection:
        connection.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    _drop(postgres_admin, name)


KEPT_TABLES = frozenset({VERSION_TABLE, "alembic_version", "version_info"})
"""The tables that say which schema this is (ours, Optuna's Alembic, Optuna's own): kept."""


class PostgresPool:
    """Migrated PostgreSQL databases, copied from the template and reused: a test's database is
    emptied when it ends (every table but :data:`KEPT_TABLES`, identities restarted) instead of
    dropped. ``CREATE DATABASE`` copies the whole system catalog (200-280 ms here, ~90 times a
    run); the emptying takes ~20 ms. A database whose tables are no longer the template's, or
    that cannot be emptied, is dropped instead."""

    def __init__(self, admin: Engine, template: str) -> None:
        self.admin, self.template = admin, template
        self.free: list[tuple[str, str]] = []
        self.tables: frozenset[str] | None = None

    def take(self) -> tuple[str, str]:
        if self.free:
            return self.free.pop()
        name, url = _postgres_database(self.admin, self.template)
        if self.tables is None:
            with _connect(url) as connection:
                self.tables = _tables(connection)
        return name, url

    def give_back(self, name: str, url: str) -> None:
        try:
            emptied = self._empty(url)
        except DBAPIError as error:
            warnings.warn(f"test database {name} not emptied: {error}", stacklevel=2)
            emptied = False
        if emptied:
            self.free.append((name, url))
        else:
            _drop(self.admin, name)

    def _empty(self, url: str) -> bool:
        with _connect(url) as connection:
            # Sessions the test left open (a thread's, a leaked engine's) would hold locks.
            connection.exec_driver_sql("SET lock_timeout = '5s'")
            connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            tables = _tables(connection)
            if tables != self.tables:
                return False
            cleared = ", ".join(f'"{table}"' for table in sorted(tables - KEPT_TABLES))
            connection.exec_driver_sql(f"TRUNCATE {cleared} RESTART IDENTITY CASCADE")
        return True

    def close(self) -> None:
        for name, _ in self.free:
            _drop(self.admin, name)


@contextlib.contextmanager
def _connect(url: str) -> Iterator[Connection]:
    engine = create_engine(normalise_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def _tables(connection: Connection) -> frozenset[str]:
    query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    return frozenset(connection.exec_driver_sql(query).scalars())


@pytest.fixture(scope="session")
def postgres_pool(postgres_admin: Engine, postgres_template: str) -> Iterator[PostgresPool]:
    pool = PostgresPool(postgres_admin, postgres_template)
    yield pool
    pool.close()


def _use(url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CBAM_NAS_DATABASE_URL", url)
    get_settings.cache_clear()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """A fresh, empty database (not migrated), also set as CBAM_NAS_DATABASE_URL.

    On PostgreSQL a database of its own (CREATE DATABASE), dropped after the test.
    """
    if request.param == "sqlite":
        yield _use(f"sqlite:///{tmp_path / 'db' / 'cbam-nas.db'}", monkeypatch)
        return
    admin = request.getfixturevalue("postgres_admin")
    name, url = _postgres_database(admin)
    try:
        yield _use(url, monkeypatch)
    finally:
        _drop(admin, name)


def _open(url: str) -> Iterator[Database]:
    """A copy of a migrated template, opened as the product opens it. Not migrated again:
    Alembic's no-op upgrade reads its scripts (~25 ms a test); the templates are checked at
    the head revision once (``_migrate``)."""
    database = open_database(url)
    yield database
    database.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    sqlite_template: Path,
) -> Iterator[Database]:
    """A migrated, empty database, also set as CBAM_NAS_DATABASE_URL: SQLite and PostgreSQL
    in turn, each a copy of a migrated template (on PostgreSQL emptied after the test and
    reused: :class:`PostgresPool`)."""
    if request.param == "sqlite":
        path = tmp_path / "db" / "cbam-nas.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sqlite_template, path)
        yield from _open(_use(f"sqlite:///{path}", monkeypatch))
        return
    pool: PostgresPool = request.getfixturevalue("postgres_pool")
    name, url = pool.take()
    try:
        yield from _open(_use(url, monkeypatch))
    finally:
        pool.give_back(name, url)


@pytest.fixture
def sqlite_db(settings: Settings, sqlite_template: Path) -> Iterator[Database]:
    """The migrated SQLite database of the test's settings (a copy of the template)."""
    path = settings.sqlite_path
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sqlite_template, path)
    yield from _open(settings.database_url)


@pytest.fixture(scope="session")
def served_search(
    tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path
) -> Iterator[Served]:
    """One ``cbam-nas serve`` (SQLite, one local worker) after it finished ``SERVED_SPEC``: the
    dashboard's browser tests and serve's end-to-end test share it (about 15 s to make)."""
    state = tmp_path_factory.mktemp("served")
    env = {
        "CBAM_NAS_DATABASE_URL": f"sqlite:///{state / 'cbam-nas.db'}",
        "CBAM_NAS_ARTIFACTS_DIR": str(state / "artifacts"),
        "CBAM_NAS_CACHE_DIR": str(state / "cache"),
        "CBAM_NAS_TOKEN_FILE": str(state / "token"),
        "CBAM_NAS_DATA_DIR": str(shared_data_dir),
    }
    served = start_serve(state, env)
    try:
        served.search_id = run_search(served, SERVED_SPEC)
        yield served
    finally:
        stop_serve(served.process)


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright drives the system's Chromium (``apt-get install chromium``); Playwright's
    own browser download cannot work offline. Missing Chromium skips, except under CI."""
    path = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not os.path.exists(path):
        reason = f"Chromium not found at {path}: apt-get install chromium (or set CHROMIUM_PATH)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (.ci/run)")
        pytest.skip(reason)
    return {**browser_type_launch_args, "executable_path": path, "args": CHROMIUM_ARGS}
