"""Initial schema: searches, trial results, API tokens, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _state() -> sa.String:
    """Enums are stored as their string values (no native enum type, no CHECK constraint)."""
    return sa.String(length=16)


def upgrade() -> None:
    op.create_table(
        "searches",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", _state(), nullable=False),
        sa.Column("study_name", sa.String(length=255), nullable=False),
        sa.Column("budget_trials", sa.Integer(), nullable=False),
        sa.Column("claimed", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_searches"),
        sa.UniqueConstraint("idempotency_key", name="uq_searches_idempotency_key"),
        sa.UniqueConstraint("study_name", name="uq_searches_study_name"),
    )
    op.create_index("ix_searches_state_created_at", "searches", ["state", "created_at"])

    op.create_table(
        "trial_results",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("search_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("optuna_number", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("architecture", sa.JSON(), nullable=False),
        sa.Column("arch_id", sa.String(length=32), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("reference", _state(), nullable=True),
        sa.Column("state", _state(), nullable=False),
        sa.Column("val_accuracy", sa.Double(), nullable=True),
        sa.Column("final_val_accuracy", sa.Double(), nullable=True),
        sa.Column("test_accuracy", sa.Double(), nullable=True),
        sa.Column("params", sa.BigInteger(), nullable=True),
        sa.Column("macs", sa.BigInteger(), nullable=True),
        sa.Column("attention_ops", sa.BigInteger(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.Column("train_step_ms", sa.Double(), nullable=True),
        sa.Column("peak_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("params_pct", sa.Double(), nullable=True),
        sa.Column("macs_pct", sa.Double(), nullable=True),
        sa.Column("latency_pct", sa.Double(), nullable=True),
        sa.Column("epochs_run", sa.Integer(), nullable=False),
        sa.Column("wall_time_s", sa.Double(), nullable=True),
        sa.Column("images_per_s", sa.Double(), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("learning_curve", sa.JSON(), nullable=False),
        sa.Column("heartbeat_at", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(
            ["search_id"],
            ["searches.id"],
            name="fk_trial_results_search_id_searches",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_trial_results"),
        sa.UniqueConstraint(
            "search_id", "number", "attempt", name="uq_trial_results_search_id_number_attempt"
        ),
    )
    # For the leaderboard (one search's rows by state, sorted by each metric), finding a search's
    # architectures, and finding stale running trials.
    op.create_index("ix_trial_results_search_id_state", "trial_results", ["search_id", "state"])
    op.create_index(
        "ix_trial_results_search_id_val_accuracy", "trial_results", ["search_id", "val_accuracy"]
    )
    op.create_index("ix_trial_results_search_id_params", "trial_results", ["search_id", "params"])
    op.create_index("ix_trial_results_search_id_macs", "trial_results", ["search_id", "macs"])
    op.create_index(
        "ix_trial_results_search_id_latency_ms", "trial_results", ["search_id", "latency_ms"]
    )
    op.create_index("ix_trial_results_search_id_arch_id", "trial_results", ["search_id", "arch_id"])
    op.create_index(
        "ix_trial_results_state_heartbeat_at", "trial_results", ["state", "heartbeat_at"]
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token_hash", sa.String(length=128), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("last_used_at", _utc(), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )

    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("last_seen", _utc(), nullable=False),
        sa.Column("current_search_id", sa.String(length=32), nullable=True),
        sa.Column("current_trial", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["current_search_id"],
            ["searches.id"],
            name="fk_workers_current_search_id_searches",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )
    op.create_index("ix_workers_last_seen", "workers", ["last_seen"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("api_tokens")
    op.drop_table("trial_results")
    op.drop_table("searches")
