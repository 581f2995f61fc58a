"""A covering index for the leaderboard's ranking scan and the search-version query.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = [
    "search_id",
    "state",
    "val_accuracy",
    "params",
    "macs",
    "latency_ms",
    "number",
    "reference",
    "finished_at",
]


def upgrade() -> None:
    op.create_index("ix_trial_results_ranking", "trial_results", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_trial_results_ranking", table_name="trial_results")
