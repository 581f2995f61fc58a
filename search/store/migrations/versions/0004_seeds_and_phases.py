"""Seeds and phases: each trial row records its training seed, the schedule it trains for, the
size of the validation split it is scored on, and whether it explores or confirms.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trial_results") as batch:
        batch.add_column(
            sa.Column("phase", sa.String(16), nullable=False, server_default="explore")
        )
        batch.add_column(sa.Column("seed", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("fidelity_epochs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("val_images", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trial_results") as batch:
        for column in ("val_images", "fidelity_epochs", "seed", "phase"):
            batch.drop_column(column)
