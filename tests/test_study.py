"""The study of a search: objectives, samplers, references, retries, early-stopping policies."""

from __future__ import annotations

from collections import Counter
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from search.results.queries import rung_accuracies
from search.space import REFERENCE_NAMES, Architecture, SearchSpace, reference_architectures
from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import ResultState, Search, TrialResult
from search.store.searches import create_search, search_study
from search.study import optuna_fast
from search.study.early_stopping import (
    EpochContext,
    NoStopping,
    OptunaPruning,
    SuccessiveHalving,
    early_stopping_policy,
    promoted,
)
from search.study.objectives import (
    constraint_value,
    directions,
    objective_names,
    objective_values,
    set_constraint,
)
from search.study.optuna_fast import frozen_trial, retry_trial, tell_trial
from search.study.samplers import grid_space, make_sampler
from search.study.studies import architecture_for

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(**overrides: Any) -> SearchSpec:
    data: dict[str, Any] = {
        "backbone": "cifar_resnet20",
        "dataset": {"name": "synthetic"},
        "budget": {"trials": 6},
        "training": {"epochs": 9},
    }
    data.update(overrides)
    return SearchSpec.from_dict(data)


CONSTRAINED = {"overheads": ["params"], "constraint_overhead": "params", "constraint_max_pct": 1.0}


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


def test_objectives_multi_and_constrained() -> None:
    spec = _spec(objectives={"overheads": ["params", "latency"]})
    assert objective_names(spec) == ["val_accuracy", "params_pct", "latency_pct"]
    assert directions(spec) == ["maximize", "minimize", "minimize"]
    values = objective_values(spec, 0.9, {"params_pct": 1.5, "latency_pct": None})
    assert values == [0.9, 1.5, 0.0]
    assert constraint_value(spec, {"params_pct": 1.5}) is None

    constrained = _spec(objectives=CONSTRAINED)
    assert directions(constrained) == ["maximize"]
    assert objective_values(constrained, 0.9, {"params_pct": 1.5}) == [0.9]
    assert constraint_value(constrained, {"params_pct": 1.5}) == pytest.approx(0.5)
    assert constraint_value(constrained, {"params_pct": 0.0}) == pytest.approx(-1.0)


def test_create_search_enqueues_the_references_first(db: Database) -> None:
    spec = _spec()
    search = create_search(db, spec)
    with db.session() as session:
        row = session.get(Search, search.id)
        assert row.state.value == "queued" and row.budget_trials == 6 and row.claimed == 0
        assert SearchSpec.from_dict(row.spec) == spec
    study = search_study(db, search)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_accuracy", "params_pct"]
    seen = []
    for _ in range(4):
        trial = study.ask()
        architecture, reference = architecture_for(trial, spec)
        seen.append((architecture, reference))
        study.tell(trial, [0.5, 1.0])
    references = reference_architectures(spec.backbone)
    assert seen[:3] == [(references[name], name) for name in REFERENCE_NAMES]
    assert seen[3][1] is None and spec.space.contains(seen[3][0])
    # The paper's CBAM is inside the default space: its parameters are recorded in the trial.
    assert frozen_trial(study, 2).params == spec.space.to_params(references["cbam"])
    # Loading by study name gives the same study.
    assert len(search_study(db, search.study_name).trials) == 4


def test_small_budget_enqueues_fewer_references(db: Database) -> None:
    search = create_search(db, _spec(budget={"trials": 1}))
    study = search_study(db, search)
    assert [t.user_attrs for t in study.trials] == [{"reference": "none"}]


def test_idempotency_key_returns_the_same_search(db: Database) -> None:
    first = create_search(db, _spec(), idempotency_key="k1")
    again = create_search(db, _spec(), idempotency_key="k1")
    assert again.id == first.id
    assert len(optuna.get_all_study_names(db.optuna_storage())) == 1


def test_reference_outside_a_narrow_space_has_no_params(db: Database) -> None:
    spec = _spec(space={"arrangements": ["spatial"], "kernel_sizes": [3]})
    search = create_search(db, spec)
    study = search_study(db, search)
    for _ in range(3):
        trial = study.ask()
        architecture, reference = architecture_for(trial, spec)
        assert architecture == reference_architectures(spec.backbone)[reference]
        study.tell(trial, [0.5, 0.0])
    assert all(t.params == {} for t in study.trials)


def test_seed_offsets_draw_different_architectures(db: Database) -> None:
    spec = _spec(budget={"trials": 1}, sampler="random")
    search = create_search(db, spec)
    search_study(db, search).ask()  # the reference
    drawn = set()
    for offset in range(1, 6):
        study = search_study(db, search, seed_offset=offset)
        drawn.add(architecture_for(study.ask(), spec)[0])
    assert len(drawn) == 5
    # Same offset, same draw: searches are reproducible.
    space = SearchSpace()
    one = space.sample(optuna.create_study(sampler=make_sampler(spec, 3)).ask(), "cifar_resnet20")
    two = space.sample(optuna.create_study(sampler=make_sampler(spec, 3)).ask(), "cifar_resnet20")
    assert one == two


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "grid"])
def test_every_sampler_runs_a_study(db: Database, sampler: str) -> None:
    space = {"arrangements": ["channel", "spatial"], "reductions": [4, 16], "kernel_sizes": [3, 7]}
    spec = _spec(sampler=sampler, space=space, budget={"trials": 8})
    search = create_search(db, spec)
    for offset in range(8):
        study = search_study(db, search, seed_offset=offset)
        trial = study.ask()
        architecture, _ = architecture_for(trial, spec)
        study.tell(trial, [0.5 + 0.01 * offset, float(architecture.reduction or 0)])
    assert len(search_study(db, search).trials) == 8


def test_grid_space_lists_every_parameter() -> None:
    space = SearchSpace(arrangements=("channel", "spatial"), reductions=(4, 16), kernel_sizes=(3,))
    grid = grid_space(space, "cifar_resnet20")
    assert grid["arrangement"] == ["channel", "spatial"]
    assert grid["reduction"] == [4, 16]
    assert "kernel_size" not in grid  # one value: fixed, not suggested
    assert "spatial_pool" in grid and "pool_types" in grid and "stages" in grid


def test_constrained_study_uses_constraints(db: Database) -> None:
    spec = _spec(objectives=CONSTRAINED, early_stopping={"policy": "median"})
    search = create_search(db, spec)
    study = search_study(db, search)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    assert len(study.directions) == 1
    for pct, accuracy in ((0.0, 0.5), (5.0, 0.9), (0.5, 0.7)):
        trial = study.ask()
        set_constraint(trial, constraint_value(spec, {"params_pct": pct}))
        study.tell(trial, accuracy)
    # The most accurate trial is infeasible: the best feasible one wins.
    assert study.best_trial.number == 2
    hyperband = _spec(objectives=CONSTRAINED, early_stopping={"policy": "hyperband"})
    assert isinstance(search_study(db, search, hyperband).pruner, optuna.pruners.HyperbandPruner)


def test_retry_trial_has_the_same_params_and_attrs(db: Database) -> None:
    spec = _spec()
    search = create_search(db, spec)
    study = search_study(db, search)
    drawn = []
    for _ in range(4):
        trial = study.ask()
        drawn.append(architecture_for(trial, spec))
        study.tell(trial, state=TrialState.FAIL)
    for number in (2, 3):  # the CBAM reference and a sampled trial
        previous = frozen_trial(study, number)
        again = retry_trial(search_study(db, search, seed_offset=99), previous)
        assert again.number != previous.number
        assert again.params == previous.params and again.user_attrs == previous.user_attrs
        assert architecture_for(again, spec) == drawn[number]


def _count_statements(db: Database) -> Counter[str]:
    """Commits and parameter inserts on Optuna's storage engine, from now on (for the test)."""
    counts: Counter[str] = Counter()
    engine = db.rdb_storage().engine

    @event.listens_for(engine, "commit")
    def commit(_connection: Any) -> None:
        counts["commit"] += 1

    @event.listens_for(engine, "before_cursor_execute")
    def statement(_c: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if sql.startswith("INSERT INTO trial_params"):
            counts["param inserts"] += 1

    return counts


def test_sampled_parameters_are_written_in_one_transaction(any_db: Database) -> None:
    db = any_db
    spec = _spec(sampler="random", budget={"trials": 1})
    search = create_search(db, spec)
    study = search_study(db, search, seed_offset=1)
    tell_trial(study, study.ask(), state=TrialState.FAIL)  # the reference
    counts = _count_statements(db)
    for _ in range(2):  # the study's first parameters, then known distributions
        counts.clear()
        trial = study.ask()
        counts.clear()
        architecture, reference = architecture_for(trial, spec)
        assert reference is None and len(trial.params) >= 4
        assert counts["commit"] == 1
        if not db.is_sqlite:  # one statement (SQLite's are in-process: one per row)
            assert counts["param inserts"] == 1
        stored = frozen_trial(search_study(db, search), trial.number)
        assert stored.params == trial.params and stored.distributions == trial.distributions
        assert spec.space.sample(stored, spec.backbone) == architecture
        tell_trial(study, trial, [0.5, 1.0])
    told = frozen_trial(search_study(db, search), trial.number)
    assert told.state == TrialState.COMPLETE and told.values == [0.5, 1.0]


def test_parameters_whose_write_failed_are_written_by_the_retry(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampling retried through a database outage writes what the failed one drew."""
    spec = _spec(sampler="random", budget={"trials": 1})
    search = create_search(db, spec)
    study = search_study(db, search, seed_offset=2)
    tell_trial(study, study.ask(), state=TrialState.FAIL)  # the reference
    trial = study.ask()
    write = optuna_fast._write_params_in_one_transaction

    def outage(*_args: Any) -> bool:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(optuna_fast, "_write_params_in_one_transaction", outage)
    with pytest.raises(OperationalError):
        architecture_for(trial, spec)
    assert frozen_trial(search_study(db, search), trial.number).params == {}
    monkeypatch.setattr(optuna_fast, "_write_params_in_one_transaction", write)
    architecture, _ = architecture_for(trial, spec)
    stored = frozen_trial(search_study(db, search), trial.number)
    assert stored.params == trial.params
    assert spec.space.sample(stored, spec.backbone) == architecture


def test_parameters_on_other_storages_are_written_one_by_one() -> None:
    spec = _spec(sampler="random")
    study = optuna.create_study(sampler=make_sampler(spec))
    trial = study.ask()
    architecture, _ = architecture_for(trial, spec)
    assert study.trials[0].params == trial.params and len(trial.params) >= 4
    assert spec.space.sample(study.trials[0], spec.backbone) == architecture


# -- early stopping --------------------------------------------------------------------------


def test_promoted_keeps_the_top_fraction() -> None:
    assert promoted(0.9, [0.5, 0.6], 3)
    assert not promoted(0.5, [0.9, 0.6], 3)
    assert promoted(0.6, [0.9, 0.6, 0.1, 0.2, 0.3], 3)  # top 2 of 6, ties go on
    assert not promoted(0.3, [0.9, 0.6, 0.1, 0.2, 0.5], 3)


def _halving_stops(
    accuracy: float, others: list[float], val_images: int, chance: float = 0.1
) -> bool:
    policy = SuccessiveHalving(reduction_factor=3, min_trials_at_rung=3, rungs=[1, 3])
    context = EpochContext(None, 1, accuracy, lambda: others, val_images, chance)  # type: ignore[arg-type]
    return policy.should_stop(context)


def test_a_rung_at_chance_level_never_prunes() -> None:
    """The demo once pruned 6 of 12 trials at epoch 1 at 10-13 % (chance: 10 %)."""
    at_chance = [0.13, 0.12, 0.11, 0.10, 0.11]
    assert not _halving_stops(0.10, at_chance, val_images=300)
    # On 30,000 images a cut of 0.12 is clear of guessing, and 0.10 is below it beyond noise.
    assert _halving_stops(0.10, at_chance, val_images=30_000)
    # Two of ten classes: guessing scores 0.5, and a cut of 0.55 on 300 images is not clear of it.
    assert not _halving_stops(0.3, [0.55, 0.5, 0.52], val_images=300, chance=0.5)


def test_a_rung_prunes_only_beyond_the_noise_of_the_validation_split() -> None:
    others = [0.80, 0.60, 0.55, 0.50, 0.45]  # cut (top 2 of 6): 0.60
    assert not _halving_stops(0.57, others, val_images=300)  # within a run's Wilson interval
    assert _halving_stops(0.57, others, val_images=30_000)  # the same gap on a large split
    assert _halving_stops(0.40, others, val_images=300)  # far below: stopped
    assert not _halving_stops(0.65, others, val_images=300)  # above the cut: goes on
    assert not _halving_stops(0.40, others, val_images=0)  # no validation split: no noise known


def test_policies_from_the_spec() -> None:
    assert isinstance(early_stopping_policy(_spec(early_stopping={"policy": "none"})), NoStopping)
    halving = early_stopping_policy(_spec())
    assert isinstance(halving, SuccessiveHalving)
    assert halving.rungs == [1, 3]  # 9 epochs, reduction factor 3: no rung at the last epoch
    spec = _spec(training={"epochs": 20}, early_stopping={"min_epochs": 2, "reduction_factor": 2})
    assert early_stopping_policy(spec).rungs == [2, 4, 8, 16]  # type: ignore[attr-defined]
    constrained = _spec(objectives=CONSTRAINED, early_stopping={"policy": "hyperband"})
    assert isinstance(early_stopping_policy(constrained), OptunaPruning)


def _row(search_id: str, number: int, curve: list[float], state: ResultState) -> TrialResult:
    architecture = Architecture("cifar_resnet20", "none")
    return TrialResult(
        search_id=search_id,
        number=number,
        attempt=0,
        architecture=architecture.to_dict(),
        arch_id=architecture.id,
        state=state,
        epochs_run=len(curve),
        learning_curve=[{"epoch": i + 1, "val_accuracy": a} for i, a in enumerate(curve)],
    )


def test_successive_halving_compares_at_the_same_epoch(db: Database) -> None:
    search = create_search(db, _spec())
    with db.session() as session:
        session.add_all(
            [
                _row(search.id, 0, [0.50, 0.60, 0.70], ResultState.completed),
                _row(search.id, 1, [0.40, 0.45, 0.50], ResultState.pruned),
                _row(search.id, 2, [0.30], ResultState.running),
                _row(search.id, 3, [0.99, 0.99], ResultState.requeued),  # not counted
                _row(search.id, 4, [], ResultState.running),  # the trial being judged
            ]
        )
    with db.session() as session:
        me = session.query(TrialResult).filter_by(search_id=search.id, number=4).one().id
    policy = SuccessiveHalving(reduction_factor=3, min_trials_at_rung=3, rungs=[1, 3])

    def stop(epoch: int, accuracy: float, policy: SuccessiveHalving = policy) -> bool:
        others = lambda: rung_accuracies(db, search.id, epoch, me)  # noqa: E731
        # 10,000 validation images: noise far below these differences.
        context = EpochContext(None, epoch, accuracy, others, 10_000, 0.1)  # type: ignore[arg-type]
        return policy.should_stop(context)

    # Epoch 1: others 0.50, 0.40, 0.30; top 1 of 4 goes on.
    assert not stop(1, 0.55)
    assert stop(1, 0.45)
    assert not stop(2, 0.0)  # not a rung
    # Epoch 3: only one other trial got there: too few to judge.
    assert not stop(3, 0.0)
    lenient = SuccessiveHalving(reduction_factor=3, min_trials_at_rung=1, rungs=[1, 3])
    assert stop(3, 0.6, lenient) and not stop(3, 0.7, lenient)
