"""The one place that opens the database: SQLite by default, PostgreSQL (psycopg 3) by URL.

``open_database(url)`` returns a :class:`Database` holding the engine, a session factory, the
Optuna storage on the same database and the Alembic migrations of our tables.

SQLite runs in WAL mode with a 30 s busy timeout, foreign keys on and ``synchronous=NORMAL``
(durable at checkpoints, never corrupt) so that several worker processes can share one file.
PostgreSQL URLs without a driver (``postgresql://``, ``postgres://``) are given psycopg 3's.

Our Alembic history keeps its revision in ``cbam_nas_alembic_version``: Optuna's own Alembic
uses ``alembic_version`` in the same database.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from search.errors import InvalidValue
from search.records import Base

if TYPE_CHECKING:
    from alembic.config import Config
    from optuna.storages import RDBStorage

try:
    import fcntl
except ImportError:  # not POSIX: migrations of one SQLite file are then not serialised
    fcntl = None  # type: ignore[assignment]

VERSION_TABLE = "cbam_nas_alembic_version"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30
# Any constant: the key of the PostgreSQL advisory lock that serialises schema creation.
_PG_LOCK_KEY = 0x0CBA_3A5
_PG_ENGINE_KWARGS: dict[str, Any] = {
    "pool_size": 5,
    "max_overflow": 5,
    "pool_pre_ping": True,
    "pool_recycle": 1800,
}


def normalise_url(url: str | URL) -> URL:
    """Give PostgreSQL URLs psycopg 3 and SQLite files an absolute path; refuse other databases."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    if backend == "sqlite":
        if parsed.database not in (None, "", ":memory:") and not parsed.database.startswith(
            "file:"
        ):
            parsed = parsed.set(database=str(Path(parsed.database).expanduser().absolute()))
        return parsed
    raise InvalidValue(
        "database_url",
        parsed.render_as_string(hide_password=True),
        "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
    )


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def include_name(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Alembic filter: only our tables (Optuna's live in the same database)."""
    return type_ != "table" or name in Base.metadata.tables


class Database:
    """An opened database. Create it with :func:`open_database`.

    ``url`` is the normalised URL including its password (to hand to child processes);
    ``repr`` hides the password. ``dialect`` is ``"sqlite"`` or ``"postgresql"``.
    """

    def __init__(self, url: str | URL) -> None:
        self._url = normalise_url(url)
        self.url = self._url.render_as_string(hide_password=False)
        self.dialect = self._url.get_backend_name()
        self.engine: Engine = create_engine(self._url, **self._engine_kwargs())
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            if self.sqlite_path is not None:
                self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._storages: dict[tuple[int | None, int | None], RDBStorage] = {}
        self._storage_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Database({self._url.render_as_string(hide_password=True)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file for SQLite on disk, else None."""
        database = self._url.database
        if not self.is_sqlite or database in (None, "", ":memory:") or database.startswith("file:"):
            return None
        return Path(database)

    def _engine_kwargs(self) -> dict[str, Any]:
        """The engine arguments for this backend, shared by our engine and Optuna's."""
        if self.is_sqlite:
            return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        return dict(_PG_ENGINE_KWARGS)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on an error."""
        with self._sessions.begin() as session:
            yield session

    def optuna_storage(
        self, heartbeat_interval: int | None = None, grace_period: int | None = None
    ) -> RDBStorage:
        """Optuna's storage on the same database (one per argument pair, cached)."""
        import optuna

        key = (heartbeat_interval, grace_period)
        with self._storage_lock:
            if key not in self._storages:
                # Optuna creates and stamps its tables on first use; not safe to race.
                with self._schema_lock():
                    self._storages[key] = optuna.storages.RDBStorage(
                        self.url,
                        engine_kwargs=self._engine_kwargs(),
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                    )
            return self._storages[key]

    def migrate(self) -> None:
        """Bring our tables to the newest revision (Alembic ``upgrade head``). Idempotent and
        safe to call from several processes at once."""
        from alembic import command

        with self._schema_lock(), self.engine.connect() as connection:
            command.upgrade(self.alembic_config(connection), "head")
            connection.commit()

    def current_revision(self) -> str | None:
        """Our schema's Alembic revision, None before the first migration."""
        from alembic.migration import MigrationContext

        with self.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()

    def head_revision(self) -> str:
        """The newest revision of our migrations (what :meth:`migrate` brings the schema to)."""
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.alembic_config()).get_current_head()
        assert head is not None, "search/migrations holds no revision"
        return head

    def alembic_config(self, connection: Connection | None = None) -> Config:
        """An Alembic configuration for this database, built in code (no alembic.ini).

        With ``connection`` the migrations run on it; otherwise ``env.py`` opens this URL. E.g. a
        new revision: ``alembic.command.revision(db.alembic_config(), "msg", autogenerate=True)``.
        """
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        config.attributes["connection"] = connection
        return config

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """Serialise schema creation between processes: an advisory lock on PostgreSQL, a lock
        file beside the database on SQLite."""
        if not self.is_sqlite:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
                connection.commit()
                try:
                    yield
                finally:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY}
                    )
                    connection.commit()
            return
        if self.sqlite_path is None or fcntl is None:
            yield
            return
        lock_path = self.sqlite_path.with_name(self.sqlite_path.name + ".lock")
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def close(self) -> None:
        """Dispose of the connection pools (ours and the Optuna storages')."""
        for storage in self._storages.values():
            storage.engine.dispose()
        self._storages.clear()
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_database(url: str | URL | None = None) -> Database:
    """Open the database at ``url``, by default the settings' ``database_url``."""
    if url is None:
        from search.settings import get_settings

        url = get_settings().database_url
    return Database(url)
