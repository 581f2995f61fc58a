"""A study's sampler and pruner, from the spec.

Samplers, all seeded from ``spec.seed`` plus an offset (:func:`make_sampler`): multi-objective TPE
(the default; multivariate, grouped, with the constant liar for parallel workers), NSGA-II,
random, and grid over the space's enumerated values. Samplers are not stored with the study:
workers rebuild them, each with its own offset, so that parallel workers do not draw the same
architectures.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna

from search.space import SearchSpace
from search.spec import SearchSpec
from search.study.objectives import NATIVE_CONSTRAINTS, constraints_func

# Seed offsets of successive samplers are spread by this prime so that they never coincide.
_SEED_STRIDE = 1_000_003


class _Recorder:
    """A stand-in trial that records every ``suggest_categorical`` of ``SearchSpace.sample``,
    answering with the first choice except for ``arrangement``, which it is told."""

    def __init__(self, arrangement: str) -> None:
        self.arrangement = arrangement
        self.choices: dict[str, list[Any]] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        self.choices[name] = list(choices)
        return self.arrangement if name == "arrangement" else choices[0]


def grid_space(space: SearchSpace, backbone: str) -> dict[str, list[Any]]:
    """Every Optuna parameter ``space.sample`` may suggest, with its choices (for GridSampler).

    Parameters conditional on the arrangement are gridded over all arrangements; a trial ignores
    the ones its arrangement does not use, so the grid can hold repeats of one architecture.
    """
    grid: dict[str, list[Any]] = {}
    for arrangement in space.arrangements:
        recorder = _Recorder(arrangement)
        space.sample(recorder, backbone)  # type: ignore[arg-type]
        grid.update(recorder.choices)
    return grid


def make_sampler(spec: SearchSpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = (spec.seed + _SEED_STRIDE * seed_offset) % 2**32
    constrained = spec.objectives.constrained and not NATIVE_CONSTRAINTS
    constraints = constraints_func if constrained else None
    if spec.sampler == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                group=True,
                constant_liar=True,
                constraints_func=constraints,
            )
    if spec.sampler == "nsga2":
        population = max(4, min(50, spec.budget.trials // 4))
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=population, constraints_func=constraints
        )
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(spec.space, spec.backbone), seed=seed)
    raise ValueError(f"unknown sampler {spec.sampler!r}")


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Optuna's pruner for the median/hyperband policies (constrained mode); else none."""
    stopping = spec.early_stopping
    if stopping.policy == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=stopping.min_trials_at_rung, n_warmup_steps=stopping.min_epochs - 1
        )
    if stopping.policy == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=stopping.min_epochs,
            max_resource=spec.training.epochs,
            reduction_factor=stopping.reduction_factor,
        )
    return optuna.pruners.NopPruner()
