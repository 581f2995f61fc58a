"""Scale-out: many worker processes on one search, two searches sharing workers, dry runs.

Workers are real ``cbam-nas worker --dry-run`` processes (claim, ask, tell with made-up metrics;
nothing trained), so a trial lasts tens of milliseconds and the claims race as hard as they can.
The claim races run on SQLite and on PostgreSQL (``any_db``); fairness, the order in which one
query hands out work, on PostgreSQL, the database of deployments with many workers. Processes are
waited for with timeouts, so that a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState
from sqlalchemy import func, select, update
from support import wait_until

from search.space import Architecture
from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import ResultState, Search, SearchState, TrialResult, WorkerSeen
from search.store.searches import create_search, search_study
from workers.dry_run import dry_run_figures
from workers.options import WorkerOptions
from workers.queue import claim_trial
from workers.trial import STOPPED_REASON
from workers.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
# Workers where no worker dies: a long grace period keeps a busy machine from sweeping a live one.
WORKER_ARGS = ["--dry-run", "--no-progress", "--grace-period", "60", "--heartbeat-interval", "1"]


def _spec(trials: int, name: str = "scale", sampler: str = "tpe") -> SearchSpec:
    return SearchSpec.from_dict(
        {
            "name": name,
            "backbone": "cifar_resnet20",
            "dataset": {"name": "synthetic"},
            "budget": {"trials": trials},
            "sampler": sampler,
            "early_stopping": {"policy": "none"},
            "confirm": {"enabled": False},
        }
    )


def _spawn(log: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    """A dry-run worker process on the database of CBAM_NAS_DATABASE_URL (set by the fixture)."""
    command = [sys.executable, "-m", "service.cli", "worker", *WORKER_ARGS, "--name", name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([*command, *extra], cwd=ROOT, env=env, stdout=out, stderr=out)


def _exit_codes(workers: list[subprocess.Popen[bytes]], log: Path) -> list[int]:
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            raise AssertionError(f"a worker did not exit:\n{log.read_text()[-3000:]}") from None
    return codes


def _rows(db: Database, search_id: str) -> list[TrialResult]:
    with db.session() as session:
        query = select(TrialResult).where(TrialResult.search_id == search_id)
        return list(session.scalars(query.order_by(TrialResult.created_at, TrialResult.id)))


def _search(db: Database, search_id: str) -> Search:
    with db.session() as session:
        return session.get(Search, search_id)


def _workers_seen(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(WorkerSeen))


def _assert_completed_exactly(db: Database, search_id: str, budget: int) -> list[TrialResult]:
    """Every slot completed once as attempt 0, nothing running, one Optuna trial per slot."""
    rows = _rows(db, search_id)
    assert sorted(r.number for r in rows) == list(range(budget))  # no duplicates, no gaps
    assert {(r.attempt, r.state) for r in rows} == {(0, ResultState.completed)}
    for row in rows:
        assert row.val_accuracy is not None and row.params and row.params_pct is not None
        assert row.epochs_run == 0 and row.artifacts is None and row.finished_at is not None
    search = _search(db, search_id)
    assert search.state == SearchState.completed and search.claimed == budget
    trials = search_study(db, search).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * budget
    # Each row told its own Optuna trial, with the row's own figures.
    assert sorted(r.optuna_number for r in rows) == sorted(t.number for t in trials)
    by_number = {t.number: t for t in trials}
    for row in rows:
        values = by_number[row.optuna_number].values
        assert values == [row.val_accuracy, pytest.approx(row.params_pct)]
    return rows


# -- the dry run itself -----------------------------------------------------------------------


def test_dry_run_records_made_up_metrics_without_training(any_db: Database) -> None:
    search = create_search(any_db, _spec(6, sampler="random"))
    options = WorkerOptions(search_id=search.id, dry_run=True, poll_interval_s=0.05)
    started = time.perf_counter()
    assert Worker(options).run() == 0
    assert time.perf_counter() - started < 30  # nothing built or trained
    rows = _assert_completed_exactly(any_db, search.id, 6)
    assert [r.reference and r.reference.value for r in rows[:3]] == ["none", "se", "cbam"]
    assert rows[0].params_pct == 0 and all(r.params_pct > 0 for r in rows[1:])
    for row in rows:  # a fixed function of the architecture: the same from every worker
        accuracy, figures = dry_run_figures(Architecture.from_dict(row.architecture))
        assert row.val_accuracy == accuracy and row.params == figures["params"]
        assert row.learning_curve == [] and row.wall_time_s == 0.0


def test_dry_run_seconds_hold_each_trial_and_a_stop_hands_it_back(sqlite_db: Database) -> None:
    """``dry_run_seconds`` stands in for training: each trial holds its worker that long (a
    sleep), and a stop meanwhile hands the trial back as at an epoch boundary."""
    search = create_search(sqlite_db, _spec(3, sampler="random"))
    options = WorkerOptions(
        search_id=search.id, dry_run=True, dry_run_seconds=0.4, poll_interval_s=0.05
    )
    started = time.perf_counter()
    assert Worker(options).run() == 0
    assert time.perf_counter() - started >= 3 * 0.4
    rows = _assert_completed_exactly(sqlite_db, search.id, 3)
    assert all(r.wall_time_s == 0.4 for r in rows)

    stopped = create_search(sqlite_db, _spec(2, sampler="random"))
    options = WorkerOptions(
        search_id=stopped.id, dry_run=True, dry_run_seconds=60, poll_interval_s=0.05
    )
    worker = Worker(options)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_until(lambda: _rows(sqlite_db, stopped.id), "a claimed trial", timeout=TIMEOUT_S)
    worker.stopping.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    [row] = _rows(sqlite_db, stopped.id)
    assert row.state == ResultState.requeued and row.failure_reason.startswith(STOPPED_REASON)
    trial = search_study(sqlite_db, _search(sqlite_db, stopped.id)).trials[row.optuna_number]
    assert trial.state == TrialState.FAIL


def test_a_claim_completes_a_finished_search_and_records_the_worker(any_db: Database) -> None:
    """No completion check follows a trial: the next claim, of any search, completes a search
    whose slots are all claimed and none running, and writes the worker's row in passing."""
    done = create_search(any_db, _spec(1, name="done", sampler="random"))
    other = create_search(any_db, _spec(5, name="other", sampler="random"))
    seen = {"id": "w", "host": "h", "device": "cpu"}
    first = claim_trial(any_db, "w", "cpu", done.id, seen=seen)
    assert first is not None and first.number == 0
    with any_db.session() as session:
        worker = session.get(WorkerSeen, "w")
        assert (worker.current_search_id, worker.current_trial) == (done.id, 0)
        session.execute(
            update(TrialResult)
            .where(TrialResult.id == first.row_id)
            .values(state=ResultState.completed)
        )
    assert _search(any_db, done.id).state == SearchState.running
    claim = claim_trial(any_db, "w", "cpu", seen=seen)
    assert claim is not None and claim.search_id == other.id
    assert _search(any_db, done.id).state == SearchState.completed
    with any_db.session() as session:
        worker = session.get(WorkerSeen, "w")
        assert (worker.current_search_id, worker.current_trial) == (other.id, 0)


# -- many workers ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_eight_workers_complete_a_budget_of_40_exactly(any_db: Database, tmp_path: Path) -> None:
    """Eight workers wait idle until the search exists (a start line), then race for its 40
    slots; they are stopped with SIGTERM once it is completed."""
    log = tmp_path / "workers.log"
    workers = [_spawn(log, f"w{i}", "--poll-interval", "0.2") for i in range(8)]
    try:
        wait_until(
            lambda: _workers_seen(any_db) == 8,
            "eight idle workers",
            timeout=TIMEOUT_S,
            log=log,
            interval=0.1,
        )
        search = create_search(any_db, _spec(40))
        wait_until(
            lambda: _search(any_db, search.id).state == SearchState.completed,
            "the search to complete",
            timeout=TIMEOUT_S,
            log=log,
            interval=0.1,
        )
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
    assert _exit_codes(workers, log) == [0] * 8, log.read_text()[-3000:]

    rows = _assert_completed_exactly(any_db, search.id, 40)
    per_worker = Counter(r.worker for r in rows)
    assert len(per_worker) >= 2, per_worker  # they did race
    with any_db.session() as session:
        statement = select(func.count()).where(TrialResult.state == ResultState.running)
        assert session.scalar(statement) == 0


# -- two searches share the workers -----------------------------------------------------------


def _worker_share(claims: list[TrialResult], search_id: str, until: Any) -> float:
    """The time-averaged share of the trials in flight that belong to ``search_id``, from the
    first claim to ``until``."""
    events = sorted(
        [(r.created_at, 1, r.search_id) for r in claims]
        + [(r.finished_at, -1, r.search_id) for r in claims]
    )
    mine = total = 0.0
    in_flight: Counter[str] = Counter()
    previous = events[0][0]
    for at, change, owner in events:
        at = min(at, until)
        seconds = (at - previous).total_seconds()
        mine += seconds * in_flight[search_id]
        total += seconds * sum(in_flight.values())
        previous = at
        in_flight[owner] += change
    return mine / total


@pytest.mark.e2e
@pytest.mark.parametrize("any_db", ["postgresql"], indirect=True)
def test_two_searches_share_the_workers_fairly(any_db: Database, tmp_path: Path) -> None:
    """claim_trial gives a worker the search with the fewest trials in flight relative to its
    budget (ties: the fewest claimed). With equal budgets each search holds about half of the
    workers while both have work, and as the dry-run trials last alike, their claims interleave."""
    budget = 20
    first = create_search(any_db, _spec(budget, name="first", sampler="random"))
    second = create_search(any_db, _spec(budget, name="second", sampler="random"))
    log = tmp_path / "workers.log"
    # Trials that last (0.2 s, as training would) make the trials in flight, not claim races
    # between back-to-back no-op trials, decide which search a worker takes.
    workers = [
        _spawn(
            log, f"w{i}", "--exit-when-idle", "--poll-interval", "0.1", "--dry-run-seconds", "0.2"
        )
        for i in range(4)
    ]
    assert _exit_codes(workers, log) == [0] * 4, log.read_text()[-3000:]

    rows = [r for s in (first, second) for r in _assert_completed_exactly(any_db, s.id, budget)]
    claims = sorted(rows, key=lambda r: (r.created_at, r.id))
    order = ["first" if r.search_id == first.id else "second" for r in claims]
    # Among the first 20 claims each search got between 7 and 13 ...
    early = Counter(order[:budget])
    assert 7 <= early["first"] <= 13 and 7 <= early["second"] <= 13, order
    # ... and while both had unclaimed slots, neither ran ahead by more than a few claims.
    counts: Counter[str] = Counter()
    for index, name in enumerate(order):
        counts[name] += 1
        if counts[name] == budget:
            both_until = claims[index].created_at
            break
        assert abs(counts["first"] - counts["second"]) <= 5, order
    # Each held about half of the workers meanwhile.
    share = _worker_share(claims, first.id, both_until)
    assert 0.3 <= share <= 0.7, (share, order)
