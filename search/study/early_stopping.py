"""Early stopping of a trial at its epoch boundaries, from the spec's ``early_stopping``.

Optuna cannot prune multi-objective studies (optuna#3450), so :func:`early_stopping_policy`
builds our own policy: successive halving against the search's other trials at the same epoch,
Optuna's median or Hyperband pruner in the constrained mode, or nothing. A policy sees one
:class:`EpochContext` per epoch; the caller supplies the other trials' accuracies at that epoch
(the worker reads them from the trial-result rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import optuna

from search.spec import SearchSpec


@dataclass
class EpochContext:
    """What a policy may look at after one epoch of one trial. ``others`` gives the validation
    accuracies that the search's other trials (running, completed or pruned) recorded at the
    same epoch; it is called only by policies that compare, and only at their rungs."""

    trial: optuna.Trial
    epoch: int
    val_accuracy: float
    others: Callable[[], Sequence[float]]


class EarlyStoppingPolicy(Protocol):
    def should_stop(self, context: EpochContext) -> bool: ...


class NoStopping:
    def should_stop(self, context: EpochContext) -> bool:
        return False


@dataclass
class SuccessiveHalving:
    """Rungs at ``min_epochs * reduction_factor**k`` epochs (before the last epoch). At a rung a
    trial goes on only if its accuracy is among the top ``1/reduction_factor`` of the accuracies
    that the search's trials recorded at that same epoch (itself included), judged once
    ``min_trials_at_rung`` other trials have reached the rung; ties go on."""

    min_epochs: int
    reduction_factor: int
    min_trials_at_rung: int
    epochs: int

    def rungs(self) -> list[int]:
        out, epoch = [], self.min_epochs
        while epoch < self.epochs:
            out.append(epoch)
            epoch *= self.reduction_factor
        return out

    def should_stop(self, context: EpochContext) -> bool:
        if context.epoch not in self.rungs():
            return False
        others = context.others()
        if len(others) < self.min_trials_at_rung:
            return False
        return not promoted(context.val_accuracy, others, self.reduction_factor)


def promoted(accuracy: float, others: Sequence[float], reduction_factor: int) -> bool:
    """Whether ``accuracy`` is in the top ``1/reduction_factor`` of ``others`` plus itself."""
    ranked = sorted([*others, accuracy], reverse=True)
    keep = max(1, len(ranked) // reduction_factor)
    return accuracy >= ranked[keep - 1]


class OptunaPruning:
    """Optuna's pruner (median, Hyperband) through ``trial.report`` and ``trial.should_prune``:
    single-objective (constrained) studies only."""

    def should_stop(self, context: EpochContext) -> bool:
        context.trial.report(context.val_accuracy, context.epoch)
        return context.trial.should_prune()


def early_stopping_policy(spec: SearchSpec) -> EarlyStoppingPolicy:
    stopping = spec.early_stopping
    if stopping.policy == "halving":
        return SuccessiveHalving(
            stopping.min_epochs,
            stopping.reduction_factor,
            stopping.min_trials_at_rung,
            spec.training.epochs,
        )
    if stopping.policy in ("median", "hyperband"):
        return OptunaPruning()
    return NoStopping()
