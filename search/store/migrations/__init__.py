"""Alembic migrations of our tables; run them with ``search.store.engine.Database.migrate()``."""
