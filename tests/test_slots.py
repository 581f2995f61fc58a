"""Several trials per device (``cbam-nas worker --slots N``): the default count per device, the
cores shared between slots, and slot processes that claim, finish and hand trials back as
workers do.

The process tests run dry-run workers (claim, ask, tell with made-up metrics after a sleep), so
slots overlap for seconds without training anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from support import wait_until

from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import ResultState, Search, SearchState, TrialResult
from search.store.searches import create_search
from workers import slots

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3


def test_cpu_slots_share_the_available_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert slots.available_cores() == 8
    assert slots.default_slots("cpu") == 8  # one per core
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    assert slots.default_slots("cpu") == slots.MAX_CPU_SLOTS
    assert slots.threads_per_slot("cpu", slots.MAX_CPU_SLOTS) == 64 // slots.MAX_CPU_SLOTS
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert slots.threads_per_slot("cpu", 2) == 4 and slots.threads_per_slot("cpu", 16) == 1
    # A parent that gave this process fewer threads (serve's local workers) is obeyed.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert slots.available_cores() == 2 and slots.threads_per_slot("cpu", 1) == 2


@pytest.mark.parametrize(
    ("free", "expected"),
    [(80 * GiB, slots.MAX_CUDA_SLOTS), (7 * GiB, 2), (1 * GiB, 1)],
)
def test_cuda_slots_follow_free_memory_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch, free: int, expected: int
) -> None:
    asked: list[int] = []

    def mem_get_info(index: int) -> tuple[int, int]:
        asked.append(index)
        return free, 80 * GiB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert slots.default_slots("cuda:1") == expected and asked == [1]
    assert slots.threads_per_slot("cuda:1", expected) is None  # torch's default


def _spec(trials: int) -> SearchSpec:
    return SearchSpec.from_dict(
        {
            "backbone": "cifar_resnet20",
            "dataset": {"name": "synthetic"},
            "budget": {"trials": trials},
            "sampler": "random",
            "early_stopping": {"policy": "none"},
            "confirm": {"enabled": False},
        }
    )


def _worker(log: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "service.cli", "worker", "--dry-run", "--no-progress"]
    command += ["--grace-period", "60", "--heartbeat-interval", "1", "--poll-interval", "0.2"]
    with log.open("ab") as out:
        return subprocess.Popen([*command, *args], cwd=ROOT, stdout=out, stderr=out)


def _rows(db: Database, search_id: str) -> list[TrialResult]:
    with db.session() as session:
        query = select(TrialResult).where(TrialResult.search_id == search_id)
        return list(session.scalars(query))


@pytest.mark.e2e
def test_slots_run_trials_side_by_side_to_the_end(sqlite_db: Database, tmp_path: Path) -> None:
    search = create_search(sqlite_db, _spec(trials=4))
    log = tmp_path / "worker.log"
    supervisor = _worker(
        log, "--slots", "2", "--search", search.id, "--name", "box", "--dry-run-seconds", "0.5"
    )
    # Both slots hold a trial at the same time: two running rows, claimed by two slot workers.
    running = wait_until(
        lambda: (
            {r.worker for r in _rows(sqlite_db, search.id) if r.state == ResultState.running}
            == {"box-0", "box-1"}
        ),
        "both slots running a trial",
        timeout=120,
        log=log,
    )
    assert running
    assert supervisor.wait(timeout=180) == 0, log.read_text()[-3000:]
    rows = _rows(sqlite_db, search.id)
    assert sorted(r.number for r in rows) == list(range(4))
    assert all(r.state == ResultState.completed for r in rows)
    assert {r.worker for r in rows} == {"box-0", "box-1"}
    with sqlite_db.session() as session:
        assert session.get(Search, search.id).state == SearchState.completed


@pytest.mark.e2e
def test_stopping_the_worker_hands_every_slots_trial_back(
    sqlite_db: Database, tmp_path: Path
) -> None:
    search = create_search(sqlite_db, _spec(trials=4))
    log = tmp_path / "worker.log"
    supervisor = _worker(
        log, "--slots", "2", "--search", search.id, "--name", "box", "--dry-run-seconds", "120"
    )
    wait_until(
        lambda: sum(r.state == ResultState.running for r in _rows(sqlite_db, search.id)) == 2,
        "both slots running a trial",
        timeout=120,
        log=log,
    )
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=90) == 0, log.read_text()[-3000:]
    rows = _rows(sqlite_db, search.id)
    # Each slot's trial was handed back (to run again), none left running or lost.
    assert sorted(r.state.value for r in rows) == ["requeued", "requeued"], log.read_text()[-2000:]
    assert {r.worker for r in rows} == {"box-0", "box-1"}


def test_a_bad_slot_count_or_device_is_refused() -> None:
    from typer.testing import CliRunner

    from service.cli import app

    for args, field in ((["--slots", "0"], "--slots"), (["--device", "tpu"], "--device")):
        done = CliRunner().invoke(app, ["worker", *args])
        assert done.exit_code == 2 and field in done.output, done.output
