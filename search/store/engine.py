"""The one place that opens the database: SQLite by default, PostgreSQL (psycopg 3) by URL.

``open_database(url)`` returns a :class:`Database` holding the engine, a session factory, the
Optuna storage on the same database and the Alembic migrations of our tables.

SQLite runs in WAL mode with a 30 s busy timeout, foreign keys on and ``synchronous=NORMAL``
(durable at checkpoints, never corrupt) so that several worker processes can share one file.
PostgreSQL URLs without a driver (``postgresql://``, ``postgres://``) are given psycopg 3's.

Our Alembic history keeps its revision in ``cbam_nas_alembic_version``: Optuna's own Alembic
uses ``alembic_version`` in the same database.

With an Optuna storage URL ``grpc://HOST:PORT`` (``CBAM_NAS_OPTUNA_STORAGE_URL``), Optuna's
traffic (ask, tell, the samplers' reads of the study) goes through Optuna's gRPC storage proxy
(``cbam-nas storage-proxy``, in front of this same database) while our own tables (claims,
trial-result rows, heartbeats) are still read and written here directly.

Outages. PostgreSQL pools are sized per process by role (:data:`POOL_SIZES`: a worker needs a
few connections, the API one per request thread), check each connection before use and renew it
after 30 min. :func:`retrying` calls a function again after transient errors
(:func:`is_transient`: the server restarting, a dropped connection, a locked SQLite file) with
exponential backoff and jitter, for up to the settings' ``db_retry_s``; each
:class:`Database` logs an outage once and remembers when it ended (:attr:`Database.outage`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from filelock import FileLock
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from search.errors import InvalidValue
from search.store.models import Base
from search.study.optuna_fast import grpc_proxy

if TYPE_CHECKING:
    from alembic.config import Config
    from optuna.storages import BaseStorage, RDBStorage

VERSION_TABLE = "cbam_nas_alembic_version"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30
GRPC_DEFAULT_PORT = 13000
# How long a call through the gRPC proxy waits for an unreachable proxy before it fails.
GRPC_WAIT_S = 300
# Any constant: the key of the PostgreSQL advisory lock that serialises schema creation.
_PG_LOCK_KEY = 0x0CBA_3A5
# PostgreSQL connections are checked before use (a restarted server's dead connections are
# replaced, not handed out) and renewed after 30 min (behind proxies that drop idle ones).
_PG_ENGINE_KWARGS: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": 1800}
# An unreachable host fails a connection attempt after this many seconds (not the OS's
# minutes), so that retries keep their pace; a ``connect_timeout`` in the URL wins.
PG_CONNECT_TIMEOUT_S = 10
Role = Literal["worker", "api", "tool"]
# Connection pools per process and role, PostgreSQL only: (pool_size, max_overflow) of our
# engine, then of Optuna's storage. A worker holds one connection at a time per thread (its
# loop, its heartbeat); the API one per request thread; tools, scripts and tests as before.
POOL_SIZES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "worker": ((2, 2), (2, 2)),
    "api": ((10, 10), (2, 3)),
    "tool": ((5, 5), (5, 5)),
}

log = logging.getLogger("cbam_nas.db")
T = TypeVar("T")


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


# -- transient errors and retries ------------------------------------------------------------
#
# Transient: the database went away or is momentarily unable to answer; the same call may work
# later. SQLAlchemy errors whose connection was invalidated (a disconnect); psycopg's
# OperationalError without an SQLSTATE (no connection: refused, reset, timed out) or in the
# classes connection exception (08), transaction rollback (40: serialisation failure,
# deadlock), insufficient resources (53: too many connections), operator intervention (57:
# admin shutdown, "the database system is starting up") and system error (58), or a lock not
# available (55P03); psycopg's InterfaceError (a closed connection); SQLite's "database is
# locked"; a pool that timed out handing out a connection; Optuna's StorageInternalError
# wrapping any of these. Everything else (IntegrityError, ProgrammingError, DataError, SQLite's
# "no such table", psycopg's class 54 program limits...) is a bug or a conflict: never retried.

_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_SQLSTATES = frozenset({"55P03"})
_TRANSIENT_SQLITE = ("database is locked", "database table is locked", "database is busy")
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 10.0


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a database error worth retrying (see the list above)."""
    optuna_exceptions = sys.modules.get("optuna.exceptions")  # loaded if optuna could raise it
    if optuna_exceptions is not None and isinstance(exc, optuna_exceptions.StorageInternalError):
        return is_transient(exc.__cause__)
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return _transient_dbapi_error(exc.orig)
        return False
    if isinstance(exc, sa_exc.TimeoutError):  # the pool had no connection to hand out in time
        return True
    return _transient_dbapi_error(exc) or _transient_grpc_error(exc)


def _transient_grpc_error(exc: BaseException | None) -> bool:
    """Optuna's gRPC storage proxy (``CBAM_NAS_OPTUNA_STORAGE_URL``) restarting or out of reach."""
    grpc = sys.modules.get("grpc")  # loaded if the proxy could raise it
    if grpc is None or not isinstance(exc, grpc.RpcError):
        return False
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _transient_dbapi_error(exc: BaseException | None) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        message = str(exc).lower()
        return any(text_ in message for text_ in _TRANSIENT_SQLITE)
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return False
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        sqlstate = exc.sqlstate
        return (
            sqlstate is None
            or sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
            or sqlstate in _TRANSIENT_SQLSTATES
        )
    return False


def _first_line(exc: BaseException) -> str:
    """The database's own message of ``exc`` (without SQLAlchemy's SQL and links)."""
    inner: BaseException = exc
    while True:
        nested = getattr(inner, "orig", None) or inner.__cause__
        if nested is None or nested is inner:
            break
        inner = nested
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"


class Outage:
    """What one process knows about its database's outages: it logs each outage once (when the
    first call fails) and its end (when a call works again), and remembers when the last one
    ended. Thread-safe; :meth:`ok` is cheap while the database is up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the current outage
        self.ended_at: float | None = None  # monotonic end of the last outage
        self.count = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, what: str, exc: BaseException, deadline_s: float | None = None) -> None:
        """A call failed with a transient error: the first failure of an outage is logged."""
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
            self.count += 1
        patience = "" if deadline_s is None else f" for up to {deadline_s:g} s"
        log.warning("database unavailable (%s), retrying%s: %s", what, patience, _first_line(exc))

    def ok(self) -> None:
        """A call worked: ends the current outage, if any."""
        if self._since is None:
            return
        with self._lock:
            if self._since is None:
                return
            now = time.monotonic()
            lasted, self._since, self.ended_at = now - self._since, None, now
        log.warning("database available again after %.1f s", lasted)

    def within(self, seconds: float) -> bool:
        """Whether the database is down now or came back less than ``seconds`` ago."""
        if self._since is not None:
            return True
        return self.ended_at is not None and time.monotonic() - self.ended_at < seconds


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    deadline_s: float | None = None,
    outage: Outage | None = None,
    first_delay_s: float = RETRY_FIRST_DELAY_S,
    max_delay_s: float = RETRY_MAX_DELAY_S,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, called again after each transient database error (:func:`is_transient`).

    Waits grow from ``first_delay_s`` doubling to ``max_delay_s``, each drawn uniformly from its
    upper half (jitter, so that many workers do not all retry at once). After ``deadline_s`` of
    failures (default: the settings' ``db_retry_s``) the last error is raised. Other errors are
    raised at once. ``outage`` (e.g. :attr:`Database.outage`) logs the outage once; ``what``
    names the call in that line. ``fn`` must be safe to call again after a failure: one
    transaction, an idempotent update, or a read. ``sleep`` and ``clock`` are for tests.
    """
    if deadline_s is None:
        from search.settings import get_settings

        deadline_s = get_settings().db_retry_s
    outage = outage or Outage()
    delay, started = first_delay_s, None
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = clock()
            started = now if started is None else started
            outage.failed(what, exc, deadline_s)
            left = deadline_s - (now - started)
            if left <= 0:
                log.error("database unavailable for %.0f s (%s): giving up", now - started, what)
                raise
            sleep(min(left, random.uniform(delay / 2, delay)))
            delay = min(2 * delay, max_delay_s)
            continue
        outage.ok()
        return result


class Database:
    """An opened database. Create it with :func:`open_database`.

    ``url`` is the normalised URL including its password (to hand to child processes);
    ``repr`` hides the password. ``dialect`` is ``"sqlite"`` or ``"postgresql"``. ``role``
    sizes the connection pools (:data:`POOL_SIZES`). ``outage`` tracks this process's view of
    database outages (:meth:`retrying`, :meth:`available_for`).
    """

    def __init__(
        self, url: str | URL, optuna_storage_url: str | None = None, *, role: Role = "tool"
    ) -> None:
        if role not in POOL_SIZES:
            raise ValueError(f"unknown database role {role!r}: one of {sorted(POOL_SIZES)}")
        self.role = role
        self.outage = Outage()
        # How long :meth:`retrying` retries by default; None: the settings' ``db_retry_s``.
        self.retry_s: float | None = None
        self._url = normalise_url(url)
        # (host, port) of Optuna's gRPC storage proxy, None: Optuna uses this database directly.
        self.optuna_proxy = grpc_address(optuna_storage_url) if optuna_storage_url else None
        if self.optuna_proxy is not None and importlib.util.find_spec("grpc") is None:
            raise InvalidValue(
                "optuna_storage_url",
                optuna_storage_url,
                "unset (grpcio is not installed: pip install 'cbam-nas[proxy]')",
            )
        self._proxy: BaseStorage | None = None
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

    def _engine_kwargs(self, optuna: bool = False) -> dict[str, Any]:
        """The engine arguments for this backend: our engine's, or with ``optuna`` Optuna's."""
        if self.is_sqlite:
            return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        pool_size, max_overflow = POOL_SIZES[self.role][1 if optuna else 0]
        kwargs = {**_PG_ENGINE_KWARGS, "pool_size": pool_size, "max_overflow": max_overflow}
        if "connect_timeout" not in self._url.query:
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return kwargs

    def retrying(self, fn: Callable[[], T], *, what: str, deadline_s: float | None = None) -> T:
        """``fn()`` retried through outages of this database (:func:`retrying`), for up to
        ``deadline_s``, by default :attr:`retry_s`."""
        deadline_s = self.retry_s if deadline_s is None else deadline_s
        return retrying(fn, what=what, deadline_s=deadline_s, outage=self.outage)

    def available_for(self, seconds: float) -> bool:
        """Whether, as far as this process can tell, the database has answered for at least the
        last ``seconds``: no outage seen through :attr:`outage` in that time and (PostgreSQL)
        the server started at least that long ago, by its own clock. Raises the database's
        error when it does not answer now."""
        if self.outage.within(seconds):
            return False
        if self.is_sqlite:
            return True
        with self.engine.connect() as connection:
            uptime = connection.scalar(
                text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")
            )
        return float(uptime) >= seconds

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on an error."""
        with self._sessions.begin() as session:
            yield session

    def optuna_storage(
        self, heartbeat_interval: int | None = None, grace_period: int | None = None
    ) -> BaseStorage:
        """The storage Optuna's studies use: the gRPC proxy when one is configured (it has no
        Optuna heartbeats), else :meth:`rdb_storage`."""
        if self.optuna_proxy is None:
            return self.rdb_storage(heartbeat_interval, grace_period)
        if heartbeat_interval is not None or grace_period is not None:
            raise ValueError("Optuna's heartbeat needs its RDB storage, not the gRPC proxy")
        with self._storage_lock:
            if self._proxy is None:
                self._proxy = grpc_proxy(*self.optuna_proxy, wait_s=GRPC_WAIT_S)
            return self._proxy

    def rdb_storage(
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
                        engine_kwargs=self._engine_kwargs(optuna=True),
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
        assert head is not None, "search/store/migrations holds no revision"
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
        if self.sqlite_path is None:
            yield
            return
        with FileLock(self.sqlite_path.with_name(self.sqlite_path.name + ".lock")):
            yield

    def close(self) -> None:
        """Dispose of the connection pools (ours and the Optuna storages')."""
        for storage in self._storages.values():
            storage.engine.dispose()
        self._storages.clear()
        if self._proxy is not None:
            self._proxy.close()  # type: ignore[attr-defined]
            self._proxy = None
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def grpc_address(url: str) -> tuple[str, int]:
    """``grpc://HOST[:PORT]`` (port 13000 by default) -> (host, port)."""
    parsed = urlsplit(url)
    try:
        port = parsed.port or GRPC_DEFAULT_PORT
    except ValueError:
        port = 0
    if parsed.scheme != "grpc" or not parsed.hostname or parsed.path not in ("", "/") or not port:
        raise InvalidValue("optuna_storage_url", url, "grpc://HOST:PORT (Optuna's gRPC proxy)")
    return parsed.hostname, port


def open_database(
    url: str | URL | None = None, optuna_storage_url: str | None = None, *, role: Role = "tool"
) -> Database:
    """Open the database at ``url``, by default the settings' ``database_url``; Optuna goes
    through the proxy at ``optuna_storage_url``, by default the settings' (none: directly).
    ``role`` (``"worker"``, ``"api"``, ``"tool"``) sizes the connection pools."""
    if url is None or optuna_storage_url is None:
        from search.settings import get_settings

        settings = get_settings()
        url = settings.database_url if url is None else url
        optuna_storage_url = optuna_storage_url or settings.optuna_storage_url
    return Database(url, optuna_storage_url, role=role)
