"""Our tables on SQLite and real PostgreSQL: migrations match the models, constraints hold, and
Optuna's storage shares the database."""

from __future__ import annotations

import hashlib
import importlib
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    func,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.sql import column as sql_column
from sqlalchemy.sql import table as sql_table

from search.errors import InvalidValue
from search.settings import Settings
from search.space import REFERENCE_NAMES, Architecture
from search.store.engine import MIGRATIONS_DIR, VERSION_TABLE, Database, include_name, open_database
from search.store.models import (
    ApiToken,
    Base,
    Reference,
    ResultState,
    Search,
    SearchState,
    TrialResult,
    UTCDateTime,
    WorkerSeen,
    utcnow,
)

OUR_TABLES = {"searches", "trial_results", "api_tokens", "workers"}


@pytest.fixture
def db(any_db: Database) -> Database:
    return any_db


def _schema_diff(database: Database, metadata: MetaData) -> list:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_name": include_name,
                "compare_type": True,
                "version_table": VERSION_TABLE,
            },
        )
        return compare_metadata(context, metadata)


def _search(**overrides: object) -> Search:
    values: dict = {"name": "s", "spec": {"backbone": "cifar_resnet20"}, "budget_trials": 3}
    return Search(**{**values, **overrides})


def _result(search: Search, number: int, attempt: int = 0, **overrides: object) -> TrialResult:
    arch = Architecture("cifar_resnet20")
    values: dict = {
        "search": search,
        "number": number,
        "attempt": attempt,
        "architecture": arch.to_dict(),
        "arch_id": arch.id,
        "label": arch.describe(),
    }
    return TrialResult(**{**values, **overrides})


def test_migrations_match_the_models(db: Database) -> None:
    assert db.current_revision() == db.head_revision()
    db.migrate()  # idempotent
    assert set(inspect(db.engine).get_table_names()) >= OUR_TABLES
    assert _schema_diff(db, Base.metadata) == []
    # The comparison does see a difference when there is one.
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["searches"].append_column(Column("extra", Integer))
    assert [d[0] for d in _schema_diff(db, changed)] == ["add_column"]


def test_tokens_made_before_scopes_are_admin_after_the_upgrade(database_url: str) -> None:
    """0005 gives every token a scope; one stored at 0004 becomes admin, what every token could
    do then, and keeps working. The downgrade drops the column and the upgrade runs again."""
    from alembic import command

    from service.auth import verify_token

    secret = "s" * 43
    tokens = sql_table(
        "api_tokens",
        sql_column("id", Integer()),
        sql_column("name", String()),
        sql_column("token_hash", String()),
        sql_column("created_at", UTCDateTime()),
        sql_column("revoked", Boolean()),
    )
    with open_database(database_url) as db:
        with db.engine.connect() as connection:
            command.upgrade(db.alembic_config(connection), "0004")
            connection.execute(
                tokens.insert().values(
                    id=7,
                    name="ci",
                    token_hash=hashlib.sha256(secret.encode()).hexdigest(),
                    created_at=utcnow(),
                    revoked=False,
                )
            )
            connection.commit()
        assert "scope" not in {c["name"] for c in inspect(db.engine).get_columns("api_tokens")}
        db.migrate()
        row = verify_token(db, f"cbn_7_{secret}")
        assert row is not None and row.name == "ci" and row.scope == "admin"
        with db.engine.connect() as connection:
            command.downgrade(db.alembic_config(connection), "0004")
            connection.commit()
        assert "scope" not in {c["name"] for c in inspect(db.engine).get_columns("api_tokens")}
        db.migrate()
        assert db.current_revision() == db.head_revision()
        assert _schema_diff(db, Base.metadata) == []


def test_concurrent_migrations(database_url: str) -> None:
    databases = [open_database(database_url) for _ in range(3)]
    errors: list[BaseException] = []

    def run(database: Database) -> None:
        try:
            database.migrate()
            database.optuna_storage()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert databases[0].current_revision() == databases[0].head_revision()
    for database in databases:
        database.close()


def test_sqlite_pragmas_and_directory(settings: Settings) -> None:
    assert settings.sqlite_path is not None and not settings.sqlite_path.parent.exists()
    with open_database() as db:  # the settings' URL
        assert db.sqlite_path == settings.sqlite_path.absolute()
        assert db.sqlite_path.parent.is_dir()
        with db.engine.connect() as connection:

            def pragma(name: str) -> object:
                return connection.exec_driver_sql(f"PRAGMA {name}").scalar()

            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 30000
            assert pragma("synchronous") == 1  # NORMAL


def test_insert_query_and_cascade(db: Database) -> None:
    with db.session() as session:
        search = _search()
        search.trials.append(_result(search, 0, reference=Reference.none, val_accuracy=0.5))
        search.trials.append(
            _result(search, 1, state=ResultState.completed, val_accuracy=0.75, params=12_345)
        )
        search.trials.append(
            _result(search, 1, attempt=1, learning_curve=[{"epoch": 1, "val_accuracy": 0.5}])
        )
        session.add(search)
        session.add(WorkerSeen(id="w1", host="h", device="cpu", current_search_id=search.id))
        session.add(ApiToken(name="ci", token_hash="ab" * 32))
        search_id = search.id
    assert len(search_id) == 32 and search.study_name == f"cbam-nas-{search_id}"

    with db.session() as session:
        search = session.get(Search, search_id)
        assert search.state is SearchState.queued and search.claimed == 0
        assert search.created_at.tzinfo is not None and search.created_at.utcoffset() == timedelta(
            0
        )
        assert [(t.number, t.attempt) for t in search.trials] == [(0, 0), (1, 0), (1, 1)]
        best = session.scalars(
            select(TrialResult)
            .where(TrialResult.search_id == search_id, TrialResult.state == "completed")
            .order_by(TrialResult.val_accuracy.desc())
        ).first()
        assert best.number == 1 and best.params == 12_345
        row = best.to_dict()
        assert row["state"] == "completed" and row["reference"] is None
        assert isinstance(row["created_at"], str) and row["learning_curve"] == []
        assert search.trials[0].reference == "none"
        assert search.trials[2].learning_curve == [{"epoch": 1, "val_accuracy": 0.5}]

    with db.session() as session:  # the database's ON DELETE, not the ORM's cascade
        session.execute(Search.__table__.delete().where(Search.id == search_id))
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(TrialResult)) == 0
        assert session.get(WorkerSeen, "w1").current_search_id is None


def test_unique_constraints(db: Database) -> None:
    with db.session() as session:
        search = _search(idempotency_key="k1")
        session.add(_result(search, 0))
        search_id = search.id
    with pytest.raises(IntegrityError), db.session() as session:
        session.add(_result(session.get(Search, search_id), 0))
    with pytest.raises(IntegrityError), db.session() as session:
        session.add(_search(idempotency_key="k1"))
    with db.session() as session:  # several searches without a key are fine
        session.add_all([_search(), _search()])
    with pytest.raises(IntegrityError), db.session() as session:  # foreign key enforced
        session.add(
            TrialResult(search_id="0" * 32, number=0, architecture={}, arch_id="x", label="x")
        )


def test_session_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session() as session:
        session.add(_search(name="lost"))
        session.flush()
        raise RuntimeError("boom")
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Search)) == 0


def test_datetimes_are_utc_and_naive_ones_are_refused(db: Database) -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    with db.session() as session:
        search = _search(started_at=moment)
        session.add(search)
        search_id = search.id
    with db.session() as session:
        started = session.get(Search, search_id).started_at
        assert started == moment and started.tzinfo == timezone.utc
        assert session.scalar(select(Search.id).where(Search.started_at < utcnow())) == search_id
    with pytest.raises(StatementError, match="naive datetime"), db.session() as session:
        session.add(_search(started_at=datetime(2026, 1, 1)))


def test_enum_values_are_checked(db: Database) -> None:
    with pytest.raises(StatementError), db.session() as session:
        session.add(_search(state="paused"))


def test_optuna_storage_shares_the_database(db: Database) -> None:
    storage = db.optuna_storage()
    assert db.optuna_storage() is storage
    study = optuna.create_study(storage=storage, study_name="cbam-nas-x", directions=["maximize"])
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    tables = set(inspect(db.engine).get_table_names())
    assert {"studies", "trials", "alembic_version", VERSION_TABLE} | OUR_TABLES <= tables
    assert optuna.load_study(study_name="cbam-nas-x", storage=db.url).trials[1].number == 1
    assert _schema_diff(db, Base.metadata) == []  # Optuna's tables are not ours to compare


def test_urls_are_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pg = Database("postgresql://u:p%40ss@localhost:5432/db")
    assert pg.url == "postgresql+psycopg://u:p%40ss@localhost:5432/db"
    assert "p%40ss" not in repr(pg) and pg.sqlite_path is None
    assert Database("postgres://u@h/db").url.startswith("postgresql+psycopg://")
    monkeypatch.chdir(tmp_path)
    local = Database("sqlite:///state/x.db")
    assert local.url == f"sqlite:///{tmp_path / 'state' / 'x.db'}"
    assert (tmp_path / "state").is_dir()
    with pytest.raises(InvalidValue, match="database_url: 'mysql://u:\\*\\*\\*@h/db'"):
        Database("mysql://u:secret@h/db")


def test_enums_match_the_domain() -> None:
    assert tuple(r.value for r in Reference) == REFERENCE_NAMES


def test_migrations_are_packaged() -> None:
    """env.py and the revisions ship as modules of packages; the template as package data."""
    for package in ("search.store.migrations", "search.store.migrations.versions"):
        assert Path(importlib.import_module(package).__file__).name == "__init__.py"
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    pyproject = (MIGRATIONS_DIR.parents[2] / "pyproject.toml").read_text()
    assert '"search.store.migrations" = ["script.py.mako"]' in pyproject
