"""Every shortcut into Optuna's internals (search/study/optuna_fast.py) against its public
fallback: the same outcome when the internals are not there. (The parameter writes' fallback is
in test_study.py: other storages, a failed write; the trial reads' in test_analysis.py.)"""

from __future__ import annotations

import sys
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search.spec import SearchSpec
from search.store.engine import Database
from search.store.searches import create_search, search_study
from search.study import optuna_fast
from search.study.objectives import CONSTRAINT_ATTR
from search.study.optuna_fast import (
    _TrialsStudy,
    ask,
    frozen_trial,
    grpc_proxy,
    param_importances,
    retry_trial,
    tell_trial,
)
from search.study.studies import REFERENCE_ATTR, architecture_for

optuna.logging.set_verbosity(optuna.logging.WARNING)


class PublicOnly:
    """A study seen through its public API only: what a future Optuna might leave us."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._study, name)


def _spec() -> SearchSpec:
    return SearchSpec.from_dict(
        {
            "backbone": "cifar_resnet20",
            "dataset": {"name": "synthetic"},
            "sampler": "random",
            "budget": {"trials": 6},
        }
    )


@pytest.fixture
def study(sqlite_db: Database) -> optuna.Study:
    return search_study(sqlite_db, create_search(sqlite_db, _spec()))


@pytest.mark.parametrize("public", [False, True], ids=["shortcut", "fallback"])
def test_ask_takes_the_queue_then_new_trials(study: optuna.Study, public: bool) -> None:
    asking = PublicOnly(study) if public else study
    drained: set[str] = set()
    references = [ask(asking, drained=drained).user_attrs[REFERENCE_ATTR] for _ in range(3)]
    assert references == ["none", "se", "cbam"] and not drained
    fresh = ask(asking, drained=drained)
    assert REFERENCE_ATTR not in fresh.user_attrs and fresh.number == 3
    assert drained == ({study.study_name} if not public else set())
    architecture, reference = architecture_for(fresh, _spec())
    assert reference is None and architecture.attention == "cbam"
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.RUNNING] * 4


def test_a_new_trial_is_built_without_reading_it_back_or_read_when_it_cannot_be(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        tell_trial(study, ask(study), state=TrialState.FAIL)  # the references
    built = ask(study, queue=False)
    monkeypatch.setattr(optuna_fast, "_created_frozen_trial", lambda *_args: None)
    read = ask(study, queue=False)
    assert (built.number, read.number) == (3, 4)
    for trial in (built, read):
        trial.suggest_categorical("x", [1, 2])
        tell_trial(study, trial, [0.5, 1.0])
        stored = frozen_trial(study, trial.number)
        assert stored.state == TrialState.COMPLETE and stored.params == trial.params


def test_tell_without_optunas_internal_tell(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = ask(study)
    monkeypatch.setitem(sys.modules, "optuna.study._tell", None)  # import fails
    tell_trial(study, trial, [0.25, 3.0])
    tell_trial(study, trial, [0.5, 1.0])  # a second tell of a finished trial is skipped
    assert frozen_trial(study, trial.number).values == [0.25, 3.0]


@pytest.mark.parametrize("public", [False, True], ids=["shortcut", "fallback"])
def test_retry_and_frozen_trial(study: optuna.Study, public: bool) -> None:
    spec = _spec()
    for _ in range(4):
        trial = ask(study)
        architecture_for(trial, spec)
        trial.set_user_attr(CONSTRAINT_ATTR, 1.5)
        tell_trial(study, trial, state=TrialState.FAIL)
    asking = PublicOnly(study) if public else study
    previous = frozen_trial(asking, 3)
    assert previous.number == 3 and previous.state == TrialState.FAIL and previous.params
    again = retry_trial(asking, previous, drop_attrs=(CONSTRAINT_ATTR,))
    assert again.number == 4 and CONSTRAINT_ATTR not in again.user_attrs
    # The same parameters: carried by the new trial, or (enqueued) fixed for its sampling.
    assert architecture_for(again, spec)[0] == spec.space.sample(previous, spec.backbone)
    assert again.params == previous.params
    assert frozen_trial(asking, 4).state == TrialState.RUNNING


def test_grpc_proxy_without_optunas_client_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("grpc")
    waiting = grpc_proxy("127.0.0.1", 1, wait_s=1)
    assert type(waiting) is not optuna.storages.GrpcStorageProxy
    assert isinstance(waiting, optuna.storages.GrpcStorageProxy)
    monkeypatch.setitem(sys.modules, "optuna.storages._grpc.client", None)
    plain = grpc_proxy("127.0.0.1", 1, wait_s=1)
    assert type(plain) is optuna.storages.GrpcStorageProxy
    for proxy in (waiting, plain):
        proxy.close()


def test_importances_through_a_real_study_when_the_stand_in_falls_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    source.optimize(
        lambda t: t.suggest_int("a", 0, 9) + 0.01 * t.suggest_int("b", 0, 9), n_trials=30
    )
    trials = source.get_trials(deepcopy=False)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    through_stand_in = param_importances(trials, evaluator, ["a", "b"])
    monkeypatch.delattr(_TrialsStudy, "_is_multi_objective")
    through_study = param_importances(trials, evaluator, ["a", "b"])
    assert through_stand_in == pytest.approx(through_study)
    assert next(iter(through_study)) == "a"
