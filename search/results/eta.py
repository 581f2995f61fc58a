"""How long a search has left: the work still to run over the rate its workers have shown.

Work is counted in epochs. The rate is every row's ``epochs_run`` so far (running rows included)
over the seconds since the search started, whatever the number of workers and slots. What is
left: the exploration's unfinished budget slots, at the epochs a finished slot took on average
(early stopping included), and the confirmation's runs at ``confirm_epochs`` each. Once the
exploration is over the race is replayed: its unfinished runs and its active arms on the rounds
still to come (at most: arms may stop sooner); before, every run the race may schedule
(``spec.confirm_trials``). So while confirmation follows, the estimate is an upper bound, and it
shrinks as the race stops arms. A wall-clock budget caps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.store.confirmation import confirmation, exploration_finished
from search.store.models import Search, SearchState, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from search.spec import SearchSpec


@dataclass(frozen=True)
class Work:
    """A search's epochs so far: ``trained`` in every row (running ones included),
    ``explore_finished`` in its finished exploration rows, ``explore_running`` and
    ``confirm_running`` in the rows still training."""

    trained: int = 0
    explore_finished: int = 0
    explore_running: int = 0
    confirm_running: int = 0


def confirm_runs_left(session: Session, search: Search, spec: SearchSpec, unfinished: int) -> int:
    """The confirmation runs still to finish, at most: ``unfinished`` (its rows pending or
    running), and the active arms on the rounds not yet scheduled. 0 when the search confirms
    nothing."""
    if not spec.confirm.enabled:
        return 0
    if not exploration_finished(session, search, spec):
        return spec.confirm_trials
    race = confirmation(session, search, spec).race
    if race.finished:
        return unfinished
    rounds_after = spec.confirm.max_seeds - race.round - (1 if race.scheduled else 0)
    return unfinished + len(race.active) * max(0, rounds_after)


def eta_s(
    search: Search, spec: SearchSpec, done: int, work: Work, confirm_left: int
) -> float | None:
    """Seconds left, or None: the search is over, or nothing has trained yet to give a rate."""
    if search.state not in (SearchState.queued, SearchState.running) or search.started_at is None:
        return None
    elapsed = (utcnow() - search.started_at).total_seconds()
    if work.trained <= 0 or elapsed <= 0:
        return None
    per_slot = work.explore_finished / done if done else spec.training.epochs
    explore_left = max(0.0, (search.budget_trials - done) * per_slot - work.explore_running)
    confirm = max(0.0, confirm_left * spec.confirm_epochs - work.confirm_running)
    left = (explore_left + confirm) / (work.trained / elapsed)
    if spec.budget.wall_clock_s is not None:
        left = min(left, max(0.0, spec.budget.wall_clock_s - elapsed))
    return left
