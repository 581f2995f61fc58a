"""Ranking, Pareto front and deltas to the references, over plain rows."""

from __future__ import annotations

import random
from typing import Any

import pytest

from search.pareto import dominates, pareto_flags
from search.results.leaderboard import deltas, leaderboard
from search.store.models import ResultState, TrialResult


def _row(number: int, accuracy: float | None, params: int, **extra: Any) -> dict[str, Any]:
    return {
        "number": number,
        "val_accuracy": accuracy,
        "params": params,
        "macs": 1000 + params,
        "latency_ms": 1.0,
        "params_pct": 100.0 * (params - 100) / 100,
        "state": "completed",
        "reference": None,
        "label": f"trial {number}",
        **extra,
    }


ROWS = [
    _row(0, 0.80, 100, reference="none"),
    _row(1, 0.82, 110, reference="se"),
    _row(2, 0.85, 112, reference="cbam"),
    _row(3, 0.86, 105),  # dominates SE and CBAM
    _row(4, 0.84, 103),  # on the front
    _row(5, 0.90, 200, state="pruned"),  # not ranked
    _row(6, None, 101, state="failed"),
]


def test_dominance() -> None:
    a, b = _row(0, 0.9, 100), _row(1, 0.8, 100)
    assert dominates(a, b, ["params"]) and not dominates(b, a, ["params"])
    assert not dominates(a, a, ["params"])
    cheaper = _row(2, 0.8, 90)
    assert not dominates(a, cheaper, ["params"]) and not dominates(cheaper, a, ["params"])
    # A second overhead can take a trial off the front.
    slow = _row(3, 0.9, 100, latency_ms=2.0)
    assert dominates(a, slow, ["params", "latency"]) and not dominates(a, slow, ["params"])
    assert dominates(_row(4, 0.0, 50), _row(5, None, 50), ["params"])


def test_leaderboard_ranks_flags_and_deltas() -> None:
    board = leaderboard(ROWS)
    assert [e["number"] for e in board] == [3, 2, 4, 1, 0]
    assert [e["rank"] for e in board] == [1, 2, 3, 4, 5]
    assert {e["number"] for e in board if e["pareto"]} == {3, 4, 0}
    best = board[0]
    assert best["delta_vs_none"] == pytest.approx(6.0)
    assert best["delta_vs_se"] == pytest.approx(4.0)
    assert best["delta_vs_cbam"] == pytest.approx(1.0)
    assert best["params_pct"] == pytest.approx(5.0)
    # Including pruned trials on request.
    assert leaderboard(ROWS, states=("completed", "pruned"))[0]["number"] == 5


def test_ties_prefer_fewer_params_then_lower_number() -> None:
    rows = [_row(0, 0.8, 120), _row(1, 0.8, 110), _row(2, 0.8, 110)]
    assert [e["number"] for e in leaderboard(rows)] == [1, 2, 0]


def test_missing_references_give_no_delta() -> None:
    entry = leaderboard([_row(0, 0.8, 100)])[0]
    assert entry["delta_vs_none"] is None and entry["delta_vs_cbam"] is None
    assert deltas({"val_accuracy": None}, {"none": 0.5})["delta_vs_none"] is None


def test_pareto_front_sorted_by_overhead() -> None:
    front = sorted((e for e in leaderboard(ROWS) if e["pareto"]), key=lambda e: e["params"])
    assert [e["number"] for e in front] == [0, 4, 3]
    assert pareto_flags([], ["params"]) == []


def test_accepts_trial_result_objects() -> None:
    rows = [
        TrialResult(
            id=i,
            search_id="s",
            number=i,
            attempt=0,
            architecture={},
            arch_id="x",
            state=ResultState.completed,
            val_accuracy=accuracy,
            params=100,
            reference=None,
        )
        for i, accuracy in enumerate((0.5, 0.7))
    ]
    board = leaderboard(rows)
    assert [e["number"] for e in board] == [1, 0]
    assert board[0]["state"] == "completed"


@pytest.mark.parametrize("overheads", [["params"], ["params", "latency"]])
def test_fast_front_matches_pairwise_definition(overheads: list[str]) -> None:
    rng = random.Random(3)
    rows = [
        _row(
            i,
            rng.choice([None, *(round(rng.random(), 2) for _ in range(5))]),
            rng.randrange(100, 120),
            latency_ms=float(rng.randrange(1, 4)),
        )
        for i in range(400)
    ]
    expected = [not any(dominates(o, r, overheads) for o in rows if o is not r) for r in rows]
    assert pareto_flags(rows, overheads) == expected


def test_overhead_deltas_against_each_reference() -> None:
    best = leaderboard(ROWS, ["params", "latency"])[0]
    assert best["params_delta_vs_none"] == pytest.approx(5.0)
    assert best["params_delta_vs_se"] == pytest.approx(100.0 * (105 - 110) / 110)
    assert best["latency_delta_vs_cbam"] == pytest.approx(0.0)
