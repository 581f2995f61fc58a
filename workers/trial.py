"""What a worker hands an evaluation and gets back: a claimed trial with its architecture
(:class:`TrialContext`), and how it ended (:class:`Outcome`).

Two evaluations exist: training (:mod:`workers.training`: data, overhead, training, artifacts)
and the dry run (:mod:`workers.dry_run`: made-up figures). The worker (:mod:`workers.worker`)
claims, asks and tells around them, and closes the trial-result row with the outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from search.settings import Settings
from search.space import Architecture
from search.spec import TrainingSpec
from search.store.engine import Database
from search.store.models import ResultState
from search.study.objectives import constraint_value, set_constraint
from workers.console import Progress
from workers.options import WorkerOptions
from workers.queue import Claim

STOPPED_REASON = "worker stopped"
CANCELLED_REASON = "search cancelled"


class SearchFailed(Exception):
    """The search cannot run at all (e.g. its dataset is missing): fail the search, not a trial."""


@dataclass
class Outcome:
    """How a trial ended: the row's final state (with ``reason`` for a failure or a hand-back)
    and figures, and what the study is told (``values``, else ``optuna_state``). ``lost``: the
    row was taken from this worker (swept); there is nothing to close."""

    state: ResultState
    reason: str | None = None
    optuna_state: TrialState = TrialState.FAIL
    values: list[float] | None = None
    row: dict[str, Any] = field(default_factory=dict)
    lost: bool = False


@dataclass
class TrialContext:
    """A claimed trial, its architecture, how it trains (``training``'s schedule on ``seed``),
    and what of its worker an evaluation may use. ``trial`` is None for a confirmation run,
    which the study is never told about; ``study`` holds the run's artifacts either way."""

    claim: Claim
    trial: optuna.Trial | None
    study: optuna.Study
    architecture: Architecture
    reference: str | None
    training: TrainingSpec
    seed: int
    db: Database
    settings: Settings
    options: WorkerOptions
    device: str
    stopping: threading.Event
    progress: Progress
    artifact_store: Callable[[], Any]

    def constraint(self, figures: Mapping[str, Any]) -> float | None:
        """In the constrained mode, ``overhead_pct - max_pct`` of ``figures`` (over the
        overhead budget when > 0: then the architecture is not trained), recorded on the
        trial; None otherwise, and for a confirmation run (its architecture was within the budget
        when it was explored)."""
        trial = self.trial
        if trial is None:
            return None
        value = constraint_value(self.claim.spec, figures)
        if value is not None:
            self.db.retrying(lambda: set_constraint(trial, value), what="telling a constraint")
        return value
