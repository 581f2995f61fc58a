"""A study's objectives and constraint, from the spec's ``objectives`` section.

Validation accuracy is maximised. In the default (multi-objective) mode each overhead of
``objectives.overheads`` is minimised alongside it, in percent over the same backbone without
attention (``params_pct``, ``macs_pct``, ``latency_pct``): percentages keep the objectives on one
scale whatever the backbone, and the no-attention reference sits at 0. In the constrained mode
(``objectives.constraint_overhead``) accuracy is the single objective and the overhead a
constraint: the worker records ``overhead_pct - max_pct`` (feasible when <= 0) with
:func:`set_constraint`, as an Optuna constraint and as the user attribute ``"constraint"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from search.spec import SearchSpec

ACCURACY = "val_accuracy"
# spec overhead -> the TrialResult column (percent over no attention) that is its objective
OVERHEAD_OBJECTIVES = {"params": "params_pct", "macs": "macs_pct", "latency": "latency_pct"}
CONSTRAINT_ATTR = "constraint"


def objective_names(spec: SearchSpec) -> list[str]:
    """The study's metric names, in the order of its values."""
    if spec.objectives.constrained:
        return [ACCURACY]
    return [ACCURACY, *(OVERHEAD_OBJECTIVES[o] for o in spec.objectives.overheads)]


def directions(spec: SearchSpec) -> list[str]:
    return ["maximize"] + ["minimize"] * (len(objective_names(spec)) - 1)


def objective_values(
    spec: SearchSpec, accuracy: float, overheads: Mapping[str, Any]
) -> list[float]:
    """The values to tell: accuracy, then each overhead objective read from ``overheads`` (a
    mapping with ``params_pct`` etc.; a missing percentage counts as 0)."""
    return [accuracy] + [float(overheads.get(name) or 0.0) for name in objective_names(spec)[1:]]


def constraint_value(spec: SearchSpec, overheads: Mapping[str, Any]) -> float | None:
    """``overhead_pct - max_pct`` in the constrained mode (<= 0 feasible), else None."""
    objectives = spec.objectives
    if not objectives.constrained or objectives.constraint_max_pct is None:
        return None
    pct = overheads.get(OVERHEAD_OBJECTIVES[objectives.constraint_overhead or "params"]) or 0.0
    return float(pct) - objectives.constraint_max_pct


# Optuna 5 records constraints on the trial (Trial.set_constraint); earlier versions ask the
# sampler's constraints_func, which reads our user attribute.
NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def constraints_func(trial: FrozenTrial) -> Sequence[float]:
    """The constraint values a sampler's ``constraints_func`` reads (Optuna before 5)."""
    return [float(trial.user_attrs.get(CONSTRAINT_ATTR, 0.0))]


def set_constraint(trial: optuna.Trial, value: float) -> None:
    """Record ``overhead_pct - max_pct`` on the trial (feasible when <= 0) before it is told."""
    trial.set_user_attr(CONSTRAINT_ATTR, value)
    if NATIVE_CONSTRAINTS:
        trial.set_constraint(CONSTRAINT_ATTR, value)
