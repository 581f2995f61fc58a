"""Alembic environment, configured in code by ``search.store.engine.Database.alembic_config``.

Runs on the connection passed in ``config.attributes["connection"]`` when there is one (what
``Database.migrate()`` does), else opens ``sqlalchemy.url`` through
``search.store.engine.open_database``.
Only our tables are compared and migrated: Optuna's tables share the database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from search.store.engine import VERSION_TABLE, include_name, open_database
from search.store.models import Base

config = context.config


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    # SQLite alters tables by copying them ("batch" mode).
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
else:
    database = open_database(config.get_main_option("sqlalchemy.url"))
    try:
        with database.engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        database.close()
