"""A search's time left (``progress.eta_s``, search/results/eta.py): the epochs left over the
epochs trained per second so far, the confirmation included, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from support import quick_spec

from search.results.queries import progress
from search.space import REFERENCE_NAMES, reference_architectures
from search.store.engine import Database
from search.store.models import (
    Phase,
    Reference,
    ResultState,
    Search,
    SearchState,
    TrialResult,
    utcnow,
)
from search.store.searches import create_search

ELAPSED_S = 100.0
REFS = reference_architectures("cifar_resnet20")


def _search(db: Database, rows: list[tuple[Phase, int, ResultState, int]], **spec: Any) -> Search:
    """A running search started ``ELAPSED_S`` ago with these (phase, number, state, epochs_run)
    rows; its exploration rows are the references, its budget slots all claimed when every
    exploration row is there."""
    search = create_search(db, quick_spec(**spec))
    explored = [r for r in rows if r[0] == Phase.explore]
    with db.session() as session:
        row = session.get(Search, search.id)
        row.state = SearchState.running
        row.started_at = utcnow() - timedelta(seconds=ELAPSED_S)
        row.claimed = len(explored)
        for phase, number, state, epochs in rows:
            name = REFERENCE_NAMES[number % len(REFERENCE_NAMES)]
            architecture = REFS[name]
            session.add(
                TrialResult(
                    search_id=search.id,
                    number=number,
                    phase=phase,
                    architecture=architecture.to_dict(),
                    arch_id=architecture.id,
                    label=architecture.describe(),
                    reference=Reference(name),
                    seed=number,
                    state=state,
                    epochs_run=epochs,
                    val_accuracy=0.8 + 0.01 * number if state == ResultState.completed else None,
                    params=1000,
                )
            )
        session.flush()
        session.expunge(row)
    return row


def _eta(db: Database, search: Search) -> float | None:
    with db.session() as session:
        search = session.get(Search, search.id)
        session.expunge(search)
    return progress(db, search).eta_s


def test_the_exploration_left_over_the_rate_so_far(any_db: Database) -> None:
    """Budget 6, epochs 4: three slots done (4 + 4 + 1 epochs: one stopped early), one running
    at epoch 2. Rate: 11 epochs in 100 s. Left: 3 slots at 3 epochs a finished slot took, less
    the 2 the running one has trained: 7 epochs, 7 / 0.11 s."""
    rows = [
        (Phase.explore, 0, ResultState.completed, 4),
        (Phase.explore, 1, ResultState.completed, 4),
        (Phase.explore, 2, ResultState.pruned, 1),
        (Phase.explore, 3, ResultState.running, 2),
    ]
    search = _search(any_db, rows, trials=6, epochs=4)
    assert _eta(any_db, search) == pytest.approx(7 / (11 / ELAPSED_S), rel=0.02)


def test_the_confirmation_to_come_counts_at_most_every_run_it_may_schedule(
    any_db: Database,
) -> None:
    """Confirmation on (3 candidates + 3 references on at most 2 seeds, 4 epochs each: 48 epochs)
    after an exploration with one slot of two left (2 epochs): 50 epochs at 2 per 100 s."""
    rows = [(Phase.explore, 0, ResultState.completed, 2)]
    search = _search(
        any_db, rows, trials=2, epochs=2, confirm={"max_seeds": 2, "epochs": 4, "top_k": 3}
    )
    assert _eta(any_db, search) == pytest.approx(50 / (2 / ELAPSED_S), rel=0.02)


def test_a_race_under_way_counts_its_active_arms_on_the_rounds_to_come(any_db: Database) -> None:
    """Explored: the three references (the race's arms). Round 0 done, round 1 under way (one
    run at epoch 3 of 4). Left: that run's last epoch and 3 arms on rounds 2 and 3 (max_seeds
    4): 1 + 24 epochs, at the 3 * 2 + 2 * 4 + 4 + 4 + 3 = 25 epochs per 100 s trained so far."""
    budget = 3
    rows = [(Phase.explore, n, ResultState.completed, 2) for n in range(budget)]
    rows += [(Phase.confirm, budget + arm, ResultState.completed, 4) for arm in range(3)]
    rows += [
        (Phase.confirm, budget + 3, ResultState.completed, 4),
        (Phase.confirm, budget + 4, ResultState.completed, 4),
        (Phase.confirm, budget + 5, ResultState.running, 3),
    ]
    search = _search(
        any_db, rows, trials=budget, epochs=2, confirm={"min_seeds": 3, "max_seeds": 4, "epochs": 4}
    )
    trained = 3 * 2 + 5 * 4 + 3
    assert _eta(any_db, search) == pytest.approx(25 / (trained / ELAPSED_S), rel=0.02)


def test_no_time_left_is_guessed_before_training_or_after_the_end(any_db: Database) -> None:
    search = _search(any_db, [(Phase.explore, 0, ResultState.running, 0)], trials=4)
    assert _eta(any_db, search) is None  # nothing trained: no rate yet
    with any_db.session() as session:
        session.get(Search, search.id).state = SearchState.completed
    assert _eta(any_db, search) is None


def test_a_wall_clock_budget_caps_the_time_left(any_db: Database) -> None:
    rows = [(Phase.explore, 0, ResultState.completed, 1)]
    search = _search(any_db, rows, trials=50, epochs=1, budget={"trials": 50, "wall_clock_s": 160})
    assert _eta(any_db, search) == pytest.approx(60, abs=2)
