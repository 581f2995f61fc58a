"""Shared fixtures: every test gets its own state directory, never the checkout's ./.cbam-nas.

Databases: ``database_url`` gives each test a fresh, empty database, once on SQLite and once on
PostgreSQL (``-k sqlite`` / ``-k postgresql`` pick one). PostgreSQL is the server named by
``CBAM_NAS_TEST_DATABASE_URL`` (its role needs CREATEDB), else a throwaway server started with
``scripts/postgres.sh`` for the session (port ``CBAM_NAS_TEST_PG_PORT``, else the first free
one from 55439). Without PostgreSQL's binaries those tests are skipped, except under CI: they fail.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from support import free_port

from search.settings import Settings, get_settings
from search.store.engine import Database, normalise_url, open_database

ROOT = Path(__file__).resolve().parent.parent
PG_DEFAULT_PORT = 55439


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
    port = os.environ.get("CBAM_NAS_TEST_PG_PORT") or str(free_port(PG_DEFAULT_PORT))
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
        url = f"sqlite:///{tmp_path / 'db' / 'cbam-nas.db'}"
        monkeypatch.setenv("CBAM_NAS_DATABASE_URL", url)
        get_settings.cache_clear()
        yield url
        return
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin_url = normalise_url(request.getfixturevalue("postgres_url"))
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = admin_url.set(database=name).render_as_string(hide_password=False)
        monkeypatch.setenv("CBAM_NAS_DATABASE_URL", url)
        get_settings.cache_clear()
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _migrated(url: str | None) -> Iterator[Database]:
    database = open_database(url)
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def any_db(database_url: str) -> Iterator[Database]:
    """A migrated, empty database: SQLite and PostgreSQL in turn."""
    yield from _migrated(database_url)


@pytest.fixture
def sqlite_db(settings: Settings) -> Iterator[Database]:
    """The migrated SQLite database of the test's settings."""
    yield from _migrated(None)


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
