"""Knob importances for validation accuracy, from the search's Optuna study."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import optuna.importance  # at import (about 1 s, scikit-learn): not at the first request
from optuna.trial import FrozenTrial, TrialState

from search.errors import NotFound
from search.results.cache import CACHE, Cache, version
from search.store.models import Search
from search.study.optuna_fast import CompletedTrial, completed_trials, param_importances

if TYPE_CHECKING:
    from search.store.engine import Database

# Fewer distinct architectures (completed trials with knob values) than this: no importances.
MIN_IMPORTANCE_TRIALS = 8
# Resamples of the trials for each importance's spread.
BOOTSTRAP_RESAMPLES = 20
IMPORTANCE_EVALUATOR = "PedAnovaImportanceEvaluator"


def _no_importance(trials: int, reason: str) -> dict[str, Any]:
    return {
        "importances": {},
        "spread": {},
        "trials": trials,
        "evaluator": IMPORTANCE_EVALUATOR,
        "target": "val_accuracy",
        "reason": reason,
    }


def _as_loss(trial: CompletedTrial) -> FrozenTrial:
    """A completed trial whose single value is minus its accuracy (lower is better)."""
    return FrozenTrial(
        number=trial.number,
        state=TrialState.COMPLETE,
        value=-trial.value if trial.value is not None else None,
        datetime_start=None,
        datetime_complete=None,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=trial.number,
    )


# (database, study) -> {trial number: the completed trial as _as_loss makes it, None without knob
# values}. A completed trial never changes: each is read once per process.
_STUDY_TRIALS = Cache(maxsize=4)  # about 25 MB per 10,000 trials


def study_trials(db: Database, search: Search) -> list[FrozenTrial]:
    """The completed trials of the search's study that have knob values (the no-attention and
    SE references have none), each with minus its accuracy objective as its one value; each
    trial is read once per process (:func:`search.study.optuna_fast.completed_trials`)."""
    known: dict[int, FrozenTrial | None] = _STUDY_TRIALS.get_or_compute(
        (repr(db), search.study_name), dict
    )
    numbers, fresh = completed_trials(
        db.session, db.optuna_storage(), search.study_name, known=known
    )
    for trial in fresh:
        usable = trial.params and trial.value is not None and math.isfinite(trial.value)
        known[trial.number] = _as_loss(trial) if usable else None
    return [t for number in numbers if (t := known.get(number)) is not None]


def _importances(trials: list[FrozenTrial], varying: list[str]) -> dict[str, float]:
    with warnings.catch_warnings():
        # PED-ANOVA warns about sparse regimes of conditional knobs in small studies.
        warnings.simplefilter("ignore")
        return param_importances(trials, optuna.importance.PedAnovaImportanceEvaluator(), varying)


def _spread(trials: list[FrozenTrial], varying: list[str]) -> dict[str, list[float]]:
    """Knob -> [5th, 95th percentile] of its importance over bootstrap resamples of the trials
    (a resample whose knobs no longer vary counts those knobs at 0)."""
    rng = np.random.default_rng(0)
    draws: dict[str, list[float]] = {name: [] for name in varying}
    for _ in range(BOOTSTRAP_RESAMPLES):
        sample = [trials[i] for i in rng.integers(0, len(trials), len(trials))]
        present = {
            name
            for name in varying
            if len({repr(t.params[name]) for t in sample if name in t.params}) > 1
        }
        values = _importances(sample, sorted(present)) if present else {}
        for name in varying:
            draws[name].append(float(values.get(name, 0.0)))
    return {
        name: [float(np.percentile(v, 5)), float(np.percentile(v, 95))] for name, v in draws.items()
    }


def importance(db: Database, search_id: str) -> dict[str, Any]:
    """Knob importances for validation accuracy, from the Optuna study, normalised to sum 1,
    most important first.

    Optuna's PED-ANOVA evaluator (how differently a knob's values are spread among the top 10%
    of trials than among all of them): it weighs conditional knobs (``kernel_size`` only where
    the arrangement has a spatial gate) in the trials that have them, and takes about 0.1 s
    at 10,000 trials. fANOVA sees only the knobs that every trial has (arrangement, stages,
    blocks: 1.7 s at 10,000 trials), or, given every knob, only the trials that have them all
    (over ten minutes). The target is the accuracy objective (the study's first value in
    either mode); trials without knob values (the no-attention and SE references, outside the
    space) are left out.

    ``spread``: each importance's 5th and 95th percentile over :data:`BOOTSTRAP_RESAMPLES`
    resamples of the trials (with replacement, a fixed seed): how much of the ranking the
    trials at hand decide. Computed once per change (keyed by the search and its number of
    completed trial rows). With fewer than :data:`MIN_IMPORTANCE_TRIALS` distinct
    architectures, or when no knob takes two values, ``importances`` is empty and ``reason``
    says why."""

    def compute() -> dict[str, Any]:
        with db.session() as session:
            search = session.get(Search, search_id)
        if search is None:
            raise NotFound(f"search {search_id}")
        trials = study_trials(db, search)
        distinct = len({tuple(sorted((k, repr(v)) for k, v in t.params.items())) for t in trials})
        if distinct < MIN_IMPORTANCE_TRIALS:
            return _no_importance(
                len(trials),
                f"{distinct} distinct architecture(s) with knob values; importances need "
                f"at least {MIN_IMPORTANCE_TRIALS}",
            )
        seen: dict[str, set[str]] = {}
        for trial in trials:
            for name, value in trial.params.items():
                seen.setdefault(name, set()).add(repr(value))
        varying = sorted(name for name, values in seen.items() if len(values) > 1)
        if not varying:
            return _no_importance(len(trials), "every trial has the same knob values")
        values = _importances(trials, varying)
        ranked = sorted(values.items(), key=lambda item: (-item[1], item[0]))
        return {
            "importances": {name: float(value) for name, value in ranked},
            "spread": _spread(trials, varying),
            "trials": len(trials),
            "evaluator": IMPORTANCE_EVALUATOR,
            "target": "val_accuracy",
            "reason": None,
        }

    count, _ = version(db, search_id)
    return CACHE.get_or_compute((repr(db), search_id, count, "importance"), compute)
