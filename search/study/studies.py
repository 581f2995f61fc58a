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

import contextlib
import copy
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import optuna
from sqlalchemy import select

from search.space import REFERENCE_NAMES, Architecture, SearchSpace, reference_architectures
from search.spec import SearchSpec
from search.store.models import ResultState, Search, TrialResult

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.storages import BaseStorage
    from optuna.trial import BaseTrial, FrozenTrial

    from search.store.engine import Database

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


# Parameters suggested but not yet written, per trial (see params_written_at_once).
_PendingParam = tuple[str, float, "BaseDistribution"]
_pending_params: weakref.WeakKeyDictionary[optuna.Trial, list[_PendingParam]] = (
    weakref.WeakKeyDictionary()
)


class _ParamRecorder:
    """Stands in for a trial's storage while its parameters are suggested: records each
    ``set_trial_param`` instead of writing it; every other call goes to the storage."""

    def __init__(self, storage: BaseStorage, pending: list[_PendingParam]) -> None:
        self._storage = storage
        self._pending = pending

    def set_trial_param(
        self, trial_id: int, name: str, value: float, distribution: BaseDistribution
    ) -> None:
        self._pending.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@contextlib.contextmanager
def params_written_at_once(trial: BaseTrial) -> Iterator[None]:
    """Within the block, the parameters that ``trial`` (a study's :class:`optuna.Trial`) is
    suggested are kept in memory (the trial itself knows them at once, as usual); when the block
    ends without an error they are written to the storage, in one transaction on Optuna's RDB
    storage (:func:`write_params`) instead of one per parameter. If that write fails, the
    parameters stay pending and the next block on the same trial writes them: retrying the
    whole sampling through a database outage loses none (a trial answers a parameter it knows
    without suggesting it again). Other trials (frozen, fixed, ...) are left alone."""
    if not isinstance(trial, optuna.Trial):
        yield
        return
    pending = _pending_params.setdefault(trial, [])
    storage = trial.storage
    trial.storage = _ParamRecorder(storage, pending)  # type: ignore[assignment]
    try:
        yield
    finally:
        trial.storage = storage
    if pending:
        write_params(storage, trial._trial_id, pending)
        pending.clear()


def write_params(storage: BaseStorage, trial_id: int, params: Sequence[_PendingParam]) -> None:
    """Write a trial's parameters (name, internal value, distribution): on Optuna's cached RDB
    storage in one transaction, with the checks and the distribution cache of its
    ``set_trial_param``; on any other storage one ``set_trial_param`` at a time."""
    if not _write_params_in_one_transaction(storage, trial_id, params):
        for name, value, distribution in params:
            storage.set_trial_param(trial_id, name, value, distribution)


def _write_params_in_one_transaction(
    storage: BaseStorage, trial_id: int, params: Sequence[_PendingParam]
) -> bool:
    """``_CachedStorage.set_trial_param`` for several parameters in one session, the trial
    read and checked once (Optuna's internals, as in Optuna 5.0); False where they are not as
    expected (the caller then writes one parameter at a time)."""
    try:
        from optuna.distributions import check_distribution_compatibility, distribution_to_json
        from optuna.storages._cached_storage import _CachedStorage
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import RDBStorage, _create_scoped_session
    except ImportError:
        return False
    backend = getattr(storage, "_backend", None)
    if not (
        isinstance(storage, _CachedStorage)
        and isinstance(backend, RDBStorage)
        and hasattr(backend, "_set_trial_param_without_commit")
        and hasattr(models, "TrialParamModel")
    ):
        return False
    with storage._lock:
        study_id, _ = storage._trial_id_to_study_id_and_number[trial_id]
        known = storage._studies[study_id].param_distribution
        # The rows are inserted together when the session commits.
        scoped = _create_scoped_session(backend.scoped_session, True)
        with scoped as session, session.no_autoflush:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            backend.check_trial_is_updatable(trial_id, trial.state)
            for name, value, distribution in params:
                previous = known.get(name)
                if previous is None:  # the study's first: Optuna looks for an earlier one
                    backend._set_trial_param_without_commit(
                        session, trial_id, name, value, distribution
                    )
                    continue
                check_distribution_compatibility(previous, distribution)
                session.add(
                    models.TrialParamModel(
                        trial_id=trial_id,
                        param_name=name,
                        param_value=value,
                        distribution_json=distribution_to_json(distribution),
                    )
                )
        for name, _, distribution in params:
            known.setdefault(name, distribution)
    return True


def created_trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """``optuna.Trial(study, trial_id)`` for a trial that this process has just created with
    ``study._storage.create_new_trial`` (no template): the Trial starts from the storage's own
    copy of what it created (running, nothing recorded yet) instead of reading it back (six
    queries on Optuna's RDB storage). Where that copy is not at hand (another storage, other
    Optuna internals) the trial is read as usual."""
    storage = study._storage
    created = _created_frozen_trial(storage, trial_id)
    if created is None:
        return optuna.Trial(study, trial_id)
    study._storage = _KnownTrial(storage, created)  # type: ignore[assignment]
    try:
        trial = optuna.Trial(study, trial_id)
    finally:
        study._storage = storage
    trial.storage = storage
    return trial


def _created_frozen_trial(storage: BaseStorage, trial_id: int) -> FrozenTrial | None:
    """A copy of the trial that Optuna's cached storage keeps since it created it, if it is
    still as created (running, no parameters, attributes or values); else None."""
    try:
        study_id, number = storage._trial_id_to_study_id_and_number[trial_id]  # type: ignore[attr-defined]
        created = storage._studies[study_id].trials[number]  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError):
        return None
    fresh = (
        isinstance(created, optuna.trial.FrozenTrial)
        and created._trial_id == trial_id
        and created.state == optuna.trial.TrialState.RUNNING
        and not (created.params or created.user_attrs or created.system_attrs)
        and not (created.values or created.intermediate_values)
    )
    return copy.deepcopy(created) if fresh else None


class _KnownTrial:
    """A storage that answers ``get_trial`` for one trial from a copy; all else goes through."""

    def __init__(self, storage: BaseStorage, trial: FrozenTrial) -> None:
        self._storage = storage
        self._trial = trial

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id == self._trial._trial_id:
            return self._trial
        return self._storage.get_trial(trial_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def tell_trial(
    study: optuna.Study,
    trial: optuna.Trial | int,
    values: Sequence[float] | None = None,
    state: optuna.trial.TrialState | None = None,
) -> None:
    """``study.tell(trial, values, state, skip_if_finished=True)`` without reading the told
    trial back from the storage for a return value nobody uses (Optuna's own tell, less its
    last read, where its internals are as expected)."""
    try:
        from optuna.study._tell import _tell_with_warning
    except ImportError:
        study.tell(trial, values, state=state, skip_if_finished=True)
        return
    _tell_with_warning(study, trial, values, state, skip_if_finished=True)


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
