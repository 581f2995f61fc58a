"""One Optuna study per search: created with its references enqueued, loaded with the spec's
sampler, and the one place that turns a trial into an Architecture.

References. The baselines (no attention, SE, the paper's CBAM) are enqueued first with the user
attribute ``"reference"``. Only CBAM is sampled, so a reference trial may carry no parameters:
:func:`architecture_for` is the one place that turns a trial into an Architecture.

A study lives in an Optuna storage (``Database.optuna_storage()`` of :mod:`search.store.engine`);
which search owns which study is the store's business (:mod:`search.store.searches`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import optuna

from search.space import REFERENCE_NAMES, Architecture, reference_architectures
from search.spec import SearchSpec
from search.study.objectives import directions, objective_names
from search.study.optuna_fast import params_written_at_once
from search.study.samplers import make_pruner, make_sampler

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from optuna.trial import BaseTrial

REFERENCE_ATTR = "reference"


def create_study(storage: BaseStorage | str, spec: SearchSpec, study_name: str) -> optuna.Study:
    """Create a search's study and enqueue its references (as many as the budget holds)."""
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=directions(spec),
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(objective_names(spec))
    references = reference_architectures(spec.backbone)
    for name in REFERENCE_NAMES[: spec.budget.trials]:
        architecture = references[name]
        params = spec.space.to_params(architecture) if spec.space.contains(architecture) else {}
        study.enqueue_trial(params, user_attrs={REFERENCE_ATTR: name})
    return study


def load_study(
    storage: BaseStorage | str, study_name: str, spec: SearchSpec, *, seed_offset: int = 0
) -> optuna.Study:
    """A search's study with the sampler and pruner of its spec; ``seed_offset`` seeds this
    caller's sampler apart from other workers' (e.g. the trial's slot number)."""
    return optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec, seed_offset),
        pruner=make_pruner(spec),
    )


def architecture_for(trial: BaseTrial, spec: SearchSpec) -> tuple[Architecture, str | None]:
    """The architecture a trial evaluates and its reference name (None for sampled trials).

    The parameters of a study's trial are written to the storage together when the sampling
    ends (:func:`params_written_at_once`), not one transaction per parameter."""
    reference = trial.user_attrs.get(REFERENCE_ATTR)
    with params_written_at_once(trial):
        if reference is None:
            return spec.space.sample(trial, spec.backbone), None
        architecture = reference_architectures(spec.backbone)[reference]
        if spec.space.contains(architecture):
            # Enqueued with its parameters (create_study): suggesting them records them in the
            # trial, so that the sampler learns from the reference like from any other trial.
            spec.space.sample(trial, spec.backbone)
    return architecture, reference
