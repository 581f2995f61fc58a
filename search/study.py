"""One Optuna study per search: objectives, sampler, reference trials and early stopping.

Objectives. Validation accuracy is maximised. In the default (multi-objective) mode each overhead
of ``objectives.overheads`` is minimised alongside it, in percent over the same backbone without
attention (``params_pct``, ``macs_pct``, ``latency_pct``): percentages keep the objectives on one
scale whatever the backbone, and the no-attention reference sits at 0. In the constrained mode
(``objectives.constraint_overhead``) accuracy is the single objective and the overhead a
constraint: the worker records ``overhead_pct - max_pct`` (feasible when <= 0) with
:func:`set_constraint`, as an Optuna constraint and as the user attribute ``"constraint"``.

Samplers (all seeded from ``spec.seed`` plus an offset, see :func:`load_study`): multi-objective
TPE (the default; multivariate, grouped, with the constant liar for parallel workers), NSGA-II,
random, and grid over the space's enumerated values.

References. The baselines (no attention, SE, the paper's CBAM) are enqueued first with the user
attribute ``"reference"``. Only CBAM is sampled, so a reference trial may carry no parameters:
:func:`architecture_for` is the one place that turns a trial into an Architecture.

Early stopping. Optuna cannot prune multi-objective studies (optuna#3450), so
:func:`early_stopping_policy` builds our own policy from ``spec.early_stopping``: successive
halving against the other trials of the search at the same epoch (from the learning curves of the
trial-result rows), Optuna's median or Hyperband pruner in the constrained mode, or nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import optuna
from sqlalchemy import select

from search.records import ResultState, Search, TrialResult
from search.space import REFERENCE_NAMES, Architecture, SearchSpace, reference_architectures
from search.spec import SearchSpec

if TYPE_CHECKING:
    from optuna.trial import BaseTrial, FrozenTrial

    from search.db import Database

ACCURACY = "val_accuracy"
# spec overhead -> the TrialResult column (percent over no attention) that is its objective
OVERHEAD_OBJECTIVES = {"params": "params_pct", "macs": "macs_pct", "latency": "latency_pct"}
REFERENCE_ATTR = "reference"
CONSTRAINT_ATTR = "constraint"
# Seed offsets of successive samplers are spread by this prime so that they never coincide.
_SEED_STRIDE = 1_000_003


# -- objectives ------------------------------------------------------------------------------


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
_NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def _constraints(trial: FrozenTrial) -> Sequence[float]:
    return [float(trial.user_attrs.get(CONSTRAINT_ATTR, 0.0))]


def set_constraint(trial: optuna.Trial, value: float) -> None:
    """Record ``overhead_pct - max_pct`` on the trial (feasible when <= 0) before it is told."""
    trial.set_user_attr(CONSTRAINT_ATTR, value)
    if _NATIVE_CONSTRAINTS:
        trial.set_constraint(CONSTRAINT_ATTR, value)


# -- samplers and pruners --------------------------------------------------------------------


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
    constrained = spec.objectives.constrained and not _NATIVE_CONSTRAINTS
    constraints = _constraints if constrained else None
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


# -- studies ---------------------------------------------------------------------------------


def _spec_of(search: Search | SearchSpec) -> SearchSpec:
    return search if isinstance(search, SearchSpec) else SearchSpec.from_dict(search.spec)


def create_study(db: Database, search: Search | SearchSpec, study_name: str) -> optuna.Study:
    """Create the search's study and enqueue its references (as many as the budget holds)."""
    spec = _spec_of(search)
    study = optuna.create_study(
        storage=db.optuna_storage(),
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
    db: Database,
    search: Search | str,
    spec: SearchSpec | None = None,
    *,
    seed_offset: int = 0,
) -> optuna.Study:
    """The study of ``search`` (a row, or its study name), with the sampler and pruner of its
    spec. Samplers are not stored: workers rebuild them here, each with its own ``seed_offset``
    (e.g. the slot number) so that parallel workers do not draw the same architectures."""
    if isinstance(search, str):
        with db.session() as session:
            row = session.scalars(select(Search).where(Search.study_name == search)).one()
    else:
        row = search
    spec = spec or _spec_of(row)
    return optuna.load_study(
        study_name=row.study_name,
        storage=db.optuna_storage(),
        sampler=make_sampler(spec, seed_offset),
        pruner=make_pruner(spec),
    )


def architecture_for(trial: BaseTrial, spec: SearchSpec) -> tuple[Architecture, str | None]:
    """The architecture a trial evaluates and its reference name (None for sampled trials)."""
    reference = trial.user_attrs.get(REFERENCE_ATTR)
    if reference is None:
        return spec.space.sample(trial, spec.backbone), None
    architecture = reference_architectures(spec.backbone)[reference]
    if spec.space.contains(architecture):
        # Enqueued with its parameters (create_study): suggesting them records them in the
        # trial, so that the sampler learns from the reference like from any other trial.
        spec.space.sample(trial, spec.backbone)
    return architecture, reference


def retry_trial(study: optuna.Study, previous: FrozenTrial) -> optuna.Trial:
    """A new running trial with the parameters and user attributes of ``previous`` (a re-run
    after a lost worker), created directly rather than enqueued so that no other worker's
    ``ask`` can take it."""
    storage = study._storage
    template = optuna.trial.FrozenTrial(
        number=-1,
        state=optuna.trial.TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=None,
        datetime_complete=None,
        params=dict(previous.params),
        distributions=dict(previous.distributions),
        user_attrs={k: v for k, v in previous.user_attrs.items() if k != CONSTRAINT_ATTR},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
    trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    return optuna.trial.Trial(study, trial_id)


def frozen_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """One trial of ``study`` by number, without reading the whole study."""
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return storage.get_trial(trial_id)


# -- early stopping --------------------------------------------------------------------------


@dataclass
class EpochContext:
    """What a policy may look at after one epoch of one trial."""

    db: Database
    search_id: str
    row_id: int
    trial: optuna.Trial
    epoch: int
    val_accuracy: float


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
        others = rung_accuracies(context.db, context.search_id, context.epoch, context.row_id)
        if len(others) < self.min_trials_at_rung:
            return False
        return not promoted(context.val_accuracy, others, self.reduction_factor)


def promoted(accuracy: float, others: Sequence[float], reduction_factor: int) -> bool:
    """Whether ``accuracy`` is in the top ``1/reduction_factor`` of ``others`` plus itself."""
    ranked = sorted([*others, accuracy], reverse=True)
    keep = max(1, len(ranked) // reduction_factor)
    return accuracy >= ranked[keep - 1]


def rung_accuracies(db: Database, search_id: str, epoch: int, exclude_row: int) -> list[float]:
    """The validation accuracies at ``epoch`` of the search's running, completed and pruned
    trials (from their rows' learning curves), but for row ``exclude_row``."""
    query = select(TrialResult.learning_curve).where(
        TrialResult.search_id == search_id,
        TrialResult.id != exclude_row,
        TrialResult.epochs_run >= epoch,
        TrialResult.state.in_([ResultState.running, ResultState.completed, ResultState.pruned]),
    )
    with db.session() as session:
        curves = session.scalars(query).all()
    return [float(c[epoch - 1]["val_accuracy"]) for c in curves if len(c) >= epoch]


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
