"""A search's confirmation in the database: the race of :mod:`search.study.confirmation`
replayed from the trial rows, and its next round scheduled as ``pending`` rows.

Confirmation rows are numbered after the exploration's slots: round ``r``'s run of arm ``a``
(of ``n`` arms) is slot ``budget_trials + r * n + a``, attempt 0, so that two workers scheduling
the same round collide on the (search, number, attempt) constraint and the round is inserted
once. A round is inserted whole, in one transaction. The race starts once the exploration is
finished (every slot claimed, none running, no retry pending); a search whose wall-clock budget
has passed confirms nothing more (its scheduled runs are dropped when it completes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from search.spec import SearchSpec
from search.store.attempts import pending_retries
from search.store.models import Phase, ResultState, Search, TrialResult, utcnow
from search.study.confirmation import FAILED, Arm, Race, arms, confirm_seed, race

if TYPE_CHECKING:
    from search.store.engine import Database

_RETRIED = (ResultState.requeued, ResultState.failed)


@dataclass
class Confirmation:
    """The race of a search as its rows stand: the arms and where the race is."""

    arms: list[Arm]
    race: Race


def exploration_finished(session: Session, search: Search, spec: SearchSpec) -> bool:
    """Every exploration slot claimed, none running, none waiting for a retry (``spec``: the
    search's, which every caller has parsed already)."""
    if search.claimed < search.budget_trials:
        return False
    running = exists().where(
        TrialResult.search_id == search.id,
        TrialResult.phase == Phase.explore,
        TrialResult.state == ResultState.running,
    )
    if session.scalar(select(running)):
        return False
    retries = session.scalars(pending_retries(search.id, spec.budget.max_retries)).all()
    return not any(row.phase == Phase.explore for row in retries)


def confirmation(session: Session, search: Search, spec: SearchSpec) -> Confirmation:
    """The race replayed from the search's rows (call once the exploration is finished)."""
    explored = [
        {
            "architecture": row.architecture,
            "arch_id": row.arch_id,
            "reference": row.reference.value if row.reference else None,
            "val_accuracy": row.val_accuracy,
            "params": row.params,
            "macs": row.macs,
            "latency_ms": row.latency_ms,
        }
        for row in session.scalars(
            select(TrialResult).where(
                TrialResult.search_id == search.id,
                TrialResult.phase == Phase.explore,
                TrialResult.state == ResultState.completed,
                TrialResult.val_accuracy.is_not(None),
            )
        )
    ]
    chosen = arms(spec, explored)
    n = len(chosen)
    retried = {
        row.number for row in session.scalars(pending_retries(search.id, spec.budget.max_retries))
    }
    latest: dict[int, tuple[int, ResultState, float | None]] = {}
    for number, attempt, state, accuracy in session.execute(
        select(
            TrialResult.number, TrialResult.attempt, TrialResult.state, TrialResult.val_accuracy
        ).where(TrialResult.search_id == search.id, TrialResult.phase == Phase.confirm)
    ):
        if number not in latest or attempt > latest[number][0]:
            latest[number] = (attempt, state, accuracy)
    results: dict[tuple[int, int], float | str | None] = {}
    for number, (_, state, accuracy) in latest.items():
        round_, arm = divmod(number - search.budget_trials, n)
        if state == ResultState.completed and accuracy is not None:
            results[(arm, round_)] = accuracy
        elif state in _RETRIED and number not in retried:
            results[(arm, round_)] = FAILED  # out of retries
        else:
            results[(arm, round_)] = None  # pending, running, or waiting for its retry
    return Confirmation(chosen, race(spec, n, results, runs_so_far=len(latest)))


def confirmation_finished(session: Session, search: Search, spec: SearchSpec) -> bool:
    """Whether the search has nothing left to confirm (or confirms nothing)."""
    if not spec.confirm.enabled or search.past_deadline(spec.budget.wall_clock_s):
        return True
    if not exploration_finished(session, search, spec):
        return False
    return confirmation(session, search, spec).race.finished


def schedule_round(db: Database, search_id: str) -> int:
    """Insert the next round of the search's race as pending rows, when the exploration is
    finished and the last round is complete; returns how many (0: nothing to schedule now, or
    another worker did)."""
    try:
        with db.session() as session:
            search = session.get(Search, search_id)
            if search is None:
                return 0
            spec = SearchSpec.from_dict(search.spec)
            if not spec.confirm.enabled or search.past_deadline(spec.budget.wall_clock_s):
                return 0
            if not exploration_finished(session, search, spec):
                return 0
            state = confirmation(session, search, spec)
            plan = state.race
            if plan.finished or plan.scheduled:
                return 0
            n = len(state.arms)
            now = utcnow()
            for index in plan.active:
                arm = state.arms[index]
                session.add(
                    TrialResult(
                        search_id=search.id,
                        number=search.budget_trials + plan.round * n + index,
                        attempt=0,
                        phase=Phase.confirm,
                        seed=confirm_seed(spec, plan.round),
                        fidelity_epochs=spec.confirm_epochs,
                        architecture=arm.architecture.to_dict(),
                        arch_id=arm.arch_id,
                        label=arm.architecture.describe(),
                        reference=arm.reference,
                        state=ResultState.pending,
                        learning_curve=[],
                        created_at=now,
                    )
                )
            return len(plan.active)
    except IntegrityError:
        return 0  # another worker scheduled this round


def pending_count(session: Session, search_id: str) -> int:
    return session.scalar(
        select(func.count()).where(
            TrialResult.search_id == search_id, TrialResult.state == ResultState.pending
        )
    )
