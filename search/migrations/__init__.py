"""Alembic migrations of our tables; run them with ``search.db.Database.migrate()``."""
