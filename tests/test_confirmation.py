"""Confirmation by racing (search/study/confirmation.py): the arms, the shared seeds, when arms
stop, and that the race spends far less than every arm on every seed when arms differ."""

from __future__ import annotations

from typing import Any

import numpy as np

from search.space import REFERENCE_NAMES, Architecture, reference_architectures
from search.spec import SearchSpec
from search.study.confirmation import FAILED, arms, confirm_seed, race

BACKBONE = "cifar_resnet20"


def _spec(**confirm: Any) -> SearchSpec:
    return SearchSpec.from_dict(
        {"backbone": BACKBONE, "dataset": {"name": "synthetic"}, "confirm": confirm}
    )


def _row(architecture: Architecture, accuracy: float, params: int, **extra: Any) -> dict:
    return {
        "architecture": architecture.to_dict(),
        "arch_id": architecture.id,
        "reference": None,
        "val_accuracy": accuracy,
        "params": params,
        **extra,
    }


def test_the_arms_are_the_references_then_the_front_best_first() -> None:
    spec = _spec(top_k=2)
    refs = reference_architectures(BACKBONE)
    small = Architecture(BACKBONE, arrangement="channel", stages=(3,))
    wide = Architecture(BACKBONE, kernel_size=3)
    dominated = Architecture(BACKBONE, kernel_size=5)
    explored = [
        _row(refs["cbam"], 0.80, 273_000, reference="cbam"),
        _row(small, 0.85, 270_000),
        _row(wide, 0.90, 275_000),
        _row(dominated, 0.84, 276_000),  # worse and costlier than both: not on the front
        _row(wide, 0.88, 275_000),  # the same architecture again: its best run counts
    ]
    chosen = arms(spec, explored)
    assert [a.reference for a in chosen] == [*REFERENCE_NAMES, None, None]
    assert [a.architecture for a in chosen[3:]] == [wide, small]
    assert [a.architecture for a in arms(_spec(top_k=1), explored)[3:]] == [wide]
    constrained = SearchSpec.from_dict(
        {
            **spec.to_dict(),
            "objectives": {"constraint_overhead": "params", "constraint_max_pct": 5.0},
        }
    )
    assert [a.architecture for a in arms(constrained, explored)[3:]] == [wide, small]


def test_seeds_are_shared_by_every_arm_and_differ_from_exploration() -> None:
    spec = _spec()
    seeds = [confirm_seed(spec, r) for r in range(5)]
    assert len(set(seeds)) == 5 and spec.seed not in seeds


def _results(scores: dict[int, list[float]], rounds: int) -> dict[tuple[int, int], float]:
    return {(arm, r): values[r] for arm, values in scores.items() for r in range(rounds)}


def test_the_first_rounds_run_every_arm() -> None:
    spec = _spec(min_seeds=2, max_seeds=5)
    state = race(spec, 4, {})
    assert (state.round, state.active, state.scheduled, state.finished) == (
        0,
        [0, 1, 2, 3],
        False,
        False,
    )
    running = {(0, 0): 0.9, (1, 0): None, (2, 0): 0.8, (3, 0): 0.7}
    assert race(spec, 4, running).scheduled and race(spec, 4, running).round == 0
    one_round = {(0, 0): 0.9, (1, 0): 0.5, (2, 0): 0.8, (3, 0): 0.7}
    state = race(spec, 4, one_round, runs_so_far=4)
    assert (state.round, state.active, state.scheduled) == (1, [0, 1, 2, 3], False)


def test_a_clearly_worse_arm_stops_after_min_seeds_and_tied_arms_go_on() -> None:
    spec = _spec(min_seeds=3, max_seeds=6)
    scores = {
        0: [0.90, 0.91, 0.89, 0.90, 0.91, 0.90],
        1: [0.90, 0.90, 0.90, 0.91, 0.90, 0.91],  # tied with arm 0
        2: [0.70, 0.71, 0.69, 0.70, 0.70, 0.71],  # twenty points worse on every seed
    }
    state = race(spec, 3, _results(scores, 2), runs_so_far=6)
    assert state.active == [0, 1, 2] and state.round == 2  # two seeds: not judged yet
    state = race(spec, 3, _results(scores, 3), runs_so_far=9)
    assert state.active == [0, 1] and state.stopped == {2: 2} and state.round == 3
    done = race(spec, 3, _results(scores, 6), runs_so_far=9 + 3 * 2)
    assert done.finished and done.active == [0, 1] and done.round == 6


def test_a_failed_run_stops_its_arm_and_one_arm_left_ends_the_race() -> None:
    spec = _spec(min_seeds=2, max_seeds=5)
    results: dict[tuple[int, int], float | str | None] = {(0, 0): 0.9, (1, 0): FAILED}
    state = race(spec, 2, results, runs_so_far=2)
    assert state.finished and state.active == [0] and state.stopped == {1: 0}


def test_the_trial_cap_ends_the_race() -> None:
    spec = _spec(min_seeds=2, max_seeds=5, trials=7)
    scores = {arm: [0.9, 0.9, 0.9] for arm in range(3)}
    state = race(spec, 3, _results({a: s[:2] for a, s in scores.items()}, 2), runs_so_far=6)
    assert state.finished and not state.scheduled  # a third round would need 9 runs


def _run_race(means: list[float], max_seeds: int, seed: int) -> tuple[int, object]:
    """A race of arms with these true means and run-to-run noise of one point."""
    rng = np.random.default_rng(seed)
    spec = _spec(min_seeds=2, max_seeds=max_seeds)
    results: dict[tuple[int, int], float | str | None] = {}
    runs = 0
    for _ in range(max_seeds + 1):
        state = race(spec, len(means), results, runs)
        if state.finished:
            return runs, state
        for arm in state.active:
            results[(arm, state.round)] = float(means[arm] + rng.normal(0, 0.01))
            runs += 1
    raise AssertionError("the race did not finish")


def test_racing_spends_at_most_half_the_naive_plan_when_arms_differ() -> None:
    """Six arms, the best two points ahead of the next, the rest far behind."""
    means = [0.92, 0.90, 0.80, 0.78, 0.75, 0.70]
    for seed in range(5):
        runs, state = _run_race(means, max_seeds=10, seed=seed)
        assert runs <= 0.5 * len(means) * 10, runs
        assert state.active == [0]  # the best arm is never stopped; here it is alone at the end


def test_tied_arms_run_to_max_seeds_and_the_worse_ones_stop() -> None:
    runs, state = _run_race([0.90, 0.90, 0.70, 0.70], max_seeds=8, seed=1)
    assert state.active == [0, 1] and set(state.stopped) == {2, 3}
    assert runs <= 2 * 8 + 2 * 4
