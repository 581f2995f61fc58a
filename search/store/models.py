"""SQLAlchemy models of our own tables; Optuna keeps its own tables in the same database.

Portable between SQLite and PostgreSQL: enums are stored as strings (no native enum types, no
CHECK constraints, so adding a state needs no table rebuild), JSON columns are ``sqlalchemy.JSON``
and datetimes are timezone-aware UTC on the Python side (:class:`UTCDateTime`). Every constraint
and index is declared in the models' ``__table_args__`` with a name from the metadata's naming
convention; the Alembic migrations in ``search/store/migrations`` create exactly this schema (a test
compares the two).

JSON columns are not mutation-tracked: assign a new value instead of changing one in place.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend.

    SQLite has no time zones: values are stored as naive UTC and read back with UTC attached.
    Naive datetimes are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; use an aware one (records.utcnow())")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class SearchState(str, enum.Enum):
    queued = "queued"
    running = "running"
    completed = "completed"
    cancelled = "cancelled"
    failed = "failed"


class ResultState(str, enum.Enum):
    """The state of one trial-result row (one attempt at one slot of the budget)."""

    running = "running"
    completed = "completed"
    pruned = "pruned"
    failed = "failed"
    over_budget = "over_budget"  # measured, over the overhead constraint, not trained
    requeued = "requeued"  # worker died or was stopped; the slot runs again as a new attempt
    pending = "pending"  # a confirmation run, scheduled: the next worker claims it


class Phase(str, enum.Enum):
    """Exploration draws architectures from the study; confirmation re-runs the candidates and
    the references on shared seeds (search.study.confirmation)."""

    explore = "explore"
    confirm = "confirm"


class Reference(str, enum.Enum):
    """The baseline a trial evaluates; the same names as ``search.space.REFERENCE_NAMES``."""

    none = "none"
    se = "se"
    cbam = "cbam"


def _enum(cls: type[enum.Enum]) -> Enum:
    """A string column holding the enum's values; no native enum type, no CHECK constraint."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=max(16, *(len(m.value) for m in cls)),
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        float: Double(),
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        SearchState: _enum(SearchState),
        ResultState: _enum(ResultState),
        Reference: _enum(Reference),
        Phase: _enum(Phase),
    }


class Search(Base):
    """One search: its spec (``SearchSpec.to_dict()``), state and budget accounting.

    ``claimed`` counts the trial slots handed out so far; a worker claims slot ``claimed`` with a
    conditional update (``claimed < budget_trials``) so that the budget is never exceeded.
    """

    __tablename__ = "searches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    spec: Mapped[dict[str, Any]]
    state: Mapped[SearchState] = mapped_column(default=SearchState.queued)
    study_name: Mapped[str] = mapped_column(String(255))
    budget_trials: Mapped[int]
    claimed: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)

    trials: Mapped[list[TrialResult]] = relationship(
        back_populates="search",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="(TrialResult.number, TrialResult.attempt)",
    )

    __table_args__ = (
        UniqueConstraint("study_name"),
        UniqueConstraint("idempotency_key"),
        Index("ix_searches_state_created_at", "state", "created_at"),
    )

    def __init__(self, **kwargs: Any) -> None:
        """``id`` (a uuid4 hex) and ``study_name`` are filled in now, before any flush, so that
        the Optuna study can be created under its name in the same transaction."""
        kwargs.setdefault("id", uuid.uuid4().hex)
        kwargs.setdefault("study_name", f"cbam-nas-{kwargs['id']}")
        super().__init__(**kwargs)

    def past_deadline(self, wall_clock_s: float | None) -> bool:
        """Whether the search has run longer than its wall-clock budget (None: no budget)."""
        if wall_clock_s is None or self.started_at is None:
            return False
        return utcnow() - self.started_at > timedelta(seconds=wall_clock_s)


# The figures of an OverheadReport that a trial-result row keeps (as columns of the same name).
OVERHEAD_FIELDS = (
    "params",
    "macs",
    "attention_ops",
    "latency_ms",
    "train_step_ms",
    "peak_memory_bytes",
    "params_pct",
    "macs_pct",
    "latency_pct",
)


class TrialResult(Base):
    """One attempt at one slot of a search: ``number`` 0..budget-1 explores (an architecture
    from the study), higher numbers confirm (an architecture again, on seed ``seed``).

    Overheads are absolute (``params``, ``macs``, ``latency_ms``) and in percent over the search's
    no-attention baseline (``*_pct``). ``val_accuracy`` is the best validation accuracy over the
    epochs, ``final_val_accuracy`` the last one; accuracies are fractions in [0, 1].
    """

    __tablename__ = "trial_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"))
    number: Mapped[int]
    optuna_number: Mapped[int | None]
    attempt: Mapped[int] = mapped_column(default=0)
    architecture: Mapped[dict[str, Any]]
    arch_id: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(200), default="")
    reference: Mapped[Reference | None]
    state: Mapped[ResultState] = mapped_column(default=ResultState.running)
    val_accuracy: Mapped[float | None]
    final_val_accuracy: Mapped[float | None]
    test_accuracy: Mapped[float | None]
    params: Mapped[int | None] = mapped_column(BigInteger)
    macs: Mapped[int | None] = mapped_column(BigInteger)
    attention_ops: Mapped[int | None] = mapped_column(BigInteger)
    latency_ms: Mapped[float | None]
    train_step_ms: Mapped[float | None]
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    params_pct: Mapped[float | None]
    macs_pct: Mapped[float | None]
    latency_pct: Mapped[float | None]
    epochs_run: Mapped[int] = mapped_column(default=0)
    phase: Mapped[Phase] = mapped_column(default=Phase.explore, server_default="explore")
    seed: Mapped[int | None] = mapped_column(BigInteger)  # the training seed (data order, init)
    fidelity_epochs: Mapped[int | None]  # the epochs the trial trains for (its schedule)
    val_images: Mapped[int | None]  # the validation split its accuracies are measured on
    wall_time_s: Mapped[float | None]
    images_per_s: Mapped[float | None]
    device: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    learning_curve: Mapped[list[Any]] = mapped_column(default=list)
    artifacts: Mapped[dict[str, Any] | None]  # file name -> artifact id, once stored
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    search: Mapped[Search] = relationship(back_populates="trials")

    __table_args__ = (
        UniqueConstraint("search_id", "number", "attempt"),
        Index("ix_trial_results_search_id_state", "search_id", "state"),
        Index("ix_trial_results_search_id_val_accuracy", "search_id", "val_accuracy"),
        Index("ix_trial_results_search_id_params", "search_id", "params"),
        Index("ix_trial_results_search_id_macs", "search_id", "macs"),
        Index("ix_trial_results_search_id_latency_ms", "search_id", "latency_ms"),
        Index("ix_trial_results_search_id_arch_id", "search_id", "arch_id"),
        Index("ix_trial_results_state_heartbeat_at", "state", "heartbeat_at"),
        # Covers the leaderboard's ranking scan and the search-version query (search.results.cache).
        Index(
            "ix_trial_results_ranking",
            "search_id",
            "state",
            "val_accuracy",
            "params",
            "macs",
            "latency_ms",
            "number",
            "reference",
            "finished_at",
        ),
    )

    def to_dict(self) -> dict[str, Any]:
        """Every column as a JSON value: datetimes in ISO 8601, enums as their strings."""
        out: dict[str, Any] = {}
        for column in self.__table__.columns:
            value = getattr(self, column.key)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, enum.Enum):
                value = value.value
            out[column.key] = value
        return out


class ApiToken(Base):
    """An API token; only its hash is stored. ``scope`` is read, write or admin (the service
    checks the name and enforces it); tokens made before scopes existed are admin, what every
    token could do then: the column's server default."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    scope: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")

    __table_args__ = (UniqueConstraint("name"), UniqueConstraint("token_hash"))


class WorkerSeen(Base):
    """The last heartbeat of each worker process (by its name), for the dashboard."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    device: Mapped[str] = mapped_column(String(64), default="")
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    current_search_id: Mapped[str | None] = mapped_column(
        ForeignKey("searches.id", ondelete="SET NULL")
    )
    current_trial: Mapped[int | None]

    __table_args__ = (Index("ix_workers_last_seen", "last_seen"),)
