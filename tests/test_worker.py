"""Workers end to end on a tiny synthetic search: completion, budgets under concurrency, a worker
killed with SIGKILL, SIGTERM, cancellation, stored weights, and ``cbam-nas run``.

Worker processes are started with ``python -m service.cli worker`` and waited for with timeouts,
so that a hang fails the test instead of blocking the run. Databases: SQLite and PostgreSQL
through the ``database_url`` fixture where it matters (claims and liveness), SQLite elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file
from sqlalchemy import select, update
from support import quick_spec, wait_until
from typer.testing import CliRunner

from search.build import build_model
from search.settings import Settings, get_settings
from search.space import Architecture
from search.store.attempts import LOST_REASON
from search.store.engine import Database, open_database
from search.store.models import ResultState, Search, SearchState, TrialResult, utcnow
from search.store.searches import create_search, search_study
from search.study.optuna_fast import frozen_trial
from service.cli import app
from workers.artifacts import ARTIFACTS_ATTR
from workers.data import load_dataset
from workers.options import WorkerOptions
from workers.queue import claim_trial, sweep_lost
from workers.train import evaluate
from workers.trial import STOPPED_REASON
from workers.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180
# In-process workers: heartbeat every 0.3 s; a trial without one for 2 s is lost (the rescuer).
FAST = {"heartbeat_interval_s": 0.3, "grace_period_s": 2.0, "poll_interval_s": 0.2}
FAST_ARGS = ["--heartbeat-interval", "0.3", "--poll-interval", "0.2"]
FAST_ARGS += ["--latency-repeats", "1", "--threads", "1"]
# Where no worker dies, a long grace period keeps a busy machine from making one look dead.
PATIENT_S = 30.0


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """In-process workers train with one thread (as the worker processes do); restored after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _options(search_id: str, **overrides: Any) -> WorkerOptions:
    values: dict[str, Any] = {"latency_repeats": 1, "threads": 1, **FAST, **overrides}
    return WorkerOptions(search_id=search_id, **values)


def _spawn(
    search_id: str, log: Path, *extra: str, grace_s: float = PATIENT_S
) -> subprocess.Popen[bytes]:
    """A worker process on the database of CBAM_NAS_DATABASE_URL (set by the fixtures)."""
    command = [sys.executable, "-m", "service.cli", "worker", "--search", search_id]
    command += ["--grace-period", str(grace_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, *FAST_ARGS, *extra], cwd=ROOT, env=env, stdout=out, stderr=out
        )


def _exit_code(process: subprocess.Popen[bytes], log: Path, timeout: float = TIMEOUT_S) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"worker did not exit:\n{log.read_text()[-3000:]}") from None


def _rows(db: Database, search_id: str) -> list[TrialResult]:
    with db.session() as session:
        query = (
            select(TrialResult)
            .where(TrialResult.search_id == search_id)
            .order_by(TrialResult.number, TrialResult.attempt)
        )
        return list(session.scalars(query).all())


def _search(db: Database, search_id: str) -> Search:
    with db.session() as session:
        return session.get(Search, search_id)


def _running_row(db: Database, search_id: str, min_epochs: int = 1) -> TrialResult | None:
    rows = _rows(db, search_id)
    return next(
        (r for r in rows if r.state == ResultState.running and r.epochs_run >= min_epochs), None
    )


def _completed(rows: list[TrialResult]) -> list[TrialResult]:
    return [r for r in rows if r.state == ResultState.completed]


# -- one worker ------------------------------------------------------------------------------


def test_worker_completes_a_search_and_weights_reproduce(
    any_db: Database, settings: Settings, tmp_path: Path
) -> None:
    spec = quick_spec(trials=4)
    search = create_search(any_db, spec)
    assert Worker(_options(search.id)).run() == 0

    assert _search(any_db, search.id).state == SearchState.completed
    rows = _rows(any_db, search.id)
    assert [(r.number, r.attempt, r.state) for r in rows] == [
        (n, 0, ResultState.completed) for n in range(4)
    ]
    assert [r.reference and r.reference.value for r in rows] == ["none", "se", "cbam", None]
    for row in rows:
        assert len(row.learning_curve) == row.epochs_run == 2
        assert row.val_accuracy == max(p["val_accuracy"] for p in row.learning_curve)
        assert row.params > 0 and row.macs > 0 and row.latency_ms > 0
        assert row.device == "cpu" and row.worker and row.finished_at and row.heartbeat_at
        assert row.test_accuracy is not None and row.wall_time_s > 0
    assert rows[0].params_pct == 0 and rows[2].params_pct > rows[1].params_pct > 0

    study = search_study(any_db, _search(any_db, search.id))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert trials[3].values == [rows[3].val_accuracy, pytest.approx(rows[3].params_pct)]

    # The stored weights reproduce the recorded accuracy of the final epoch.
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    store = FileSystemArtifactStore(settings.artifacts_dir)
    sampled = rows[3]
    ids = frozen_trial(study, sampled.optuna_number).user_attrs[ARTIFACTS_ATTR]
    for name, artifact_id in ids.items():
        download_artifact(
            artifact_store=store, file_path=str(tmp_path / name), artifact_id=artifact_id
        )
    architecture = Architecture.from_json((tmp_path / "architecture.json").read_text())
    assert architecture.to_dict() == sampled.architecture
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [p["val_accuracy"] for p in metrics["curve"]] == [
        p["val_accuracy"] for p in sampled.learning_curve
    ]
    data = load_dataset(spec.dataset.name, spec.dataset.options, settings.data_dir, 0.25, spec.seed)
    model = build_model(architecture, data.num_classes, data.in_channels)
    model.load_state_dict(load_file(str(tmp_path / "weights.safetensors")))
    _, accuracy = evaluate(
        model, data.val_x, data.val_y, data, "cpu", channels_last=spec.training.channels_last
    )
    assert accuracy == sampled.final_val_accuracy


def test_over_budget_architectures_are_measured_not_trained(sqlite_db: Database) -> None:
    objectives = {"constraint_overhead": "params", "constraint_max_pct": 0.5}
    search = create_search(sqlite_db, quick_spec(trials=3, epochs=1, objectives=objectives))
    assert Worker(_options(search.id)).run() == 0
    rows = _rows(sqlite_db, search.id)
    assert [r.state for r in rows] == [
        ResultState.completed,
        ResultState.over_budget,
        ResultState.over_budget,
    ]
    assert all(r.params_pct > 0.5 and r.epochs_run == 0 for r in rows[1:])
    study = search_study(sqlite_db, _search(sqlite_db, search.id))
    assert [t.state for t in study.get_trials()] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
    ]
    assert study.best_trial.user_attrs["reference"] == "none"


def test_wall_clock_budget_stops_claiming(sqlite_db: Database) -> None:
    search = create_search(
        sqlite_db, quick_spec(trials=4, epochs=1, budget={"trials": 4, "wall_clock_s": 0.01})
    )
    assert Worker(_options(search.id)).run() == 0
    assert _search(sqlite_db, search.id).state == SearchState.completed
    assert len(_rows(sqlite_db, search.id)) == 1


# -- claims and retries without training -----------------------------------------------------


def test_concurrent_claims_never_exceed_the_budget(any_db: Database) -> None:
    search = create_search(any_db, quick_spec(trials=7))
    claims: list[Any] = []

    def claimer() -> None:
        for _ in range(4):
            claim = claim_trial(any_db, threading.current_thread().name, "cpu", search.id)
            if claim is not None:
                claims.append(claim)

    threads = [threading.Thread(target=claimer, name=f"w{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(c.number for c in claims) == list(range(7))
    assert _search(any_db, search.id).claimed == 7
    assert len(_rows(any_db, search.id)) == 7


def test_lost_trials_are_requeued_and_retried_within_bounds(sqlite_db: Database) -> None:
    search = create_search(sqlite_db, quick_spec(trials=2, budget={"trials": 2, "max_retries": 1}))
    first = claim_trial(sqlite_db, "a", "cpu", search.id)
    assert (first.number, first.attempt) == (0, 0)

    def age(row_id: int) -> None:
        with sqlite_db.session() as session:
            session.execute(
                update(TrialResult)
                .where(TrialResult.id == row_id)
                .values(heartbeat_at=utcnow() - timedelta(seconds=60))
            )

    assert sweep_lost(sqlite_db, 30) == []  # fresh heartbeat
    age(first.row_id)
    assert sweep_lost(sqlite_db, 30) == [first.row_id]
    assert sweep_lost(sqlite_db, 30) == []
    lost = _rows(sqlite_db, search.id)[0]
    assert lost.state == ResultState.requeued and lost.failure_reason.startswith(LOST_REASON)
    retry = claim_trial(sqlite_db, "b", "cpu", search.id)
    assert (retry.number, retry.attempt) == (0, 1)
    # A hand-back by a signal does not count against max_retries; a second loss does.
    with sqlite_db.session() as session:
        session.execute(
            update(TrialResult)
            .where(TrialResult.id == retry.row_id)
            .values(state=ResultState.requeued, failure_reason=STOPPED_REASON)
        )
    again = claim_trial(sqlite_db, "c", "cpu", search.id)
    assert (again.number, again.attempt) == (0, 2)
    age(again.row_id)
    sweep_lost(sqlite_db, 30)
    nxt = claim_trial(sqlite_db, "d", "cpu", search.id)
    assert (nxt.number, nxt.attempt) == (1, 0)  # slot 0 is out of retries
    assert claim_trial(sqlite_db, "e", "cpu", search.id) is None


# -- several workers, killed workers, signals, cancellation ----------------------------------


@pytest.mark.e2e
def test_two_workers_never_exceed_the_budget(any_db: Database, tmp_path: Path) -> None:
    search = create_search(any_db, quick_spec(trials=5, epochs=1, samples=128))
    log = tmp_path / "workers.log"
    workers = [_spawn(search.id, log, "--name", f"w{i}") for i in range(2)]
    assert [_exit_code(w, log) for w in workers] == [0, 0], log.read_text()[-3000:]
    rows = _rows(any_db, search.id)
    assert sorted((r.number, r.attempt) for r in rows) == [(n, 0) for n in range(5)]
    assert len(_completed(rows)) == 5
    search_row = _search(any_db, search.id)
    assert search_row.state == SearchState.completed and search_row.claimed == 5
    study = search_study(any_db, search_row)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 5


@pytest.mark.e2e
@pytest.mark.parametrize("any_db", ["postgresql"], indirect=True)  # SQLite: the in-process tests
def test_killed_worker_trial_is_rerun_with_the_same_parameters(
    any_db: Database, tmp_path: Path
) -> None:
    search = create_search(any_db, quick_spec(trials=3, epochs=4, samples=384))
    log = tmp_path / "worker.log"
    victim = _spawn(search.id, log, "--name", "victim")

    def cbam_reference_running() -> TrialResult | None:
        # The paper's CBAM (slot 2) is inside the default space: it has Optuna parameters.
        row = _running_row(any_db, search.id, min_epochs=1)
        return row if row is not None and row.number == 2 else None

    try:
        running = wait_until(cbam_reference_running, "the CBAM reference at epoch 1")
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    assert Worker(_options(search.id, name="rescuer")).run() == 0

    assert _search(any_db, search.id).state == SearchState.completed
    rows = _rows(any_db, search.id)
    assert len(_completed(rows)) == 3
    lost = [r for r in rows if r.state == ResultState.requeued]
    assert [(r.number, r.attempt, r.worker) for r in lost] == [(running.number, 0, "victim")]
    assert lost[0].failure_reason.startswith(LOST_REASON)
    rerun = next(r for r in rows if (r.number, r.attempt) == (running.number, 1))
    assert rerun.state == ResultState.completed and rerun.worker == "rescuer"
    assert rerun.architecture == lost[0].architecture
    study = search_study(any_db, _search(any_db, search.id))
    old, new = frozen_trial(study, lost[0].optuna_number), frozen_trial(study, rerun.optuna_number)
    assert old.state == TrialState.FAIL and new.state == TrialState.COMPLETE
    assert old.params and new.params == old.params
    assert new.user_attrs["reference"] == old.user_attrs["reference"] == "cbam"


@pytest.mark.e2e
def test_sigterm_hands_the_trial_back(sqlite_db: Database, tmp_path: Path) -> None:
    search = create_search(sqlite_db, quick_spec(trials=1, epochs=8))
    log = tmp_path / "worker.log"
    worker = _spawn(search.id, log)
    wait_until(lambda: _running_row(sqlite_db, search.id, min_epochs=1), "a trial at epoch 1")
    worker.send_signal(signal.SIGTERM)
    assert _exit_code(worker, log, timeout=60) == 0, log.read_text()[-3000:]
    handed_back = _rows(sqlite_db, search.id)
    assert len(handed_back) == 1
    assert handed_back[0].state == ResultState.requeued
    assert handed_back[0].failure_reason.startswith(STOPPED_REASON)
    assert handed_back[0].epochs_run < 8
    assert _search(sqlite_db, search.id).state == SearchState.running

    assert Worker(_options(search.id)).run() == 0
    rows = _rows(sqlite_db, search.id)
    assert [(r.attempt, r.state) for r in rows] == [
        (0, ResultState.requeued),
        (1, ResultState.completed),
    ]
    assert rows[1].epochs_run == 8
    assert _search(sqlite_db, search.id).state == SearchState.completed


def test_cancelled_search_stops_its_worker(sqlite_db: Database) -> None:
    search = create_search(sqlite_db, quick_spec(trials=2, epochs=40))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(Worker(_options(search.id)).run()))
    thread.start()
    try:
        wait_until(lambda: _running_row(sqlite_db, search.id, 1), "a trial at epoch 1", 60)
        with sqlite_db.session() as session:
            session.execute(
                update(Search).where(Search.id == search.id).values(state=SearchState.cancelled)
            )
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive() and status == [0]
    rows = _rows(sqlite_db, search.id)
    assert len(rows) == 1 and rows[0].state == ResultState.failed
    assert rows[0].failure_reason == "search cancelled" and rows[0].epochs_run < 10
    study = search_study(sqlite_db, _search(sqlite_db, search.id))
    assert study.get_trials()[0].state == TrialState.FAIL


# -- cbam-nas run ----------------------------------------------------------------------------


TINY_YAML = """\
name: tiny
backbone: cifar_resnet20
dataset:
  name: synthetic
  options: {size: 16, num_samples: 128, num_test: 32}
  val_fraction: 0.25
training: {epochs: 1, batch_size: 32, lr: 0.05}
budget: {trials: 4}
confirm: {enabled: false}
sampler: random
"""


@pytest.mark.e2e
def test_run_prints_a_leaderboard(settings: Settings, tmp_path: Path) -> None:
    spec_file = tmp_path / "search.yaml"
    spec_file.write_text(TINY_YAML)
    command = [sys.executable, "-m", "service.cli", "run", str(spec_file), "--workers", "2"]
    command += ["--latency-repeats", "1", "--heartbeat-interval", "0.5"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for text in ("no attention", "SE r16 @all", "CBAM c->s r16 avg+max k7 @all", "Pareto"):
        assert text in out
    assert "Δ none" in out and "4 completed" in out
    with open_database() as db, db.session() as session:
        (search,) = session.scalars(select(Search)).all()
        assert search.state == SearchState.completed and search.name == "tiny"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("training: {epochs: 0}\n", "training.epochs"),
        ("dataset: {name: imagenet}\n", "dataset.name"),
        ("budget: {trials: 3, retries: 1}\n", "budget"),
        ("training: [1, 2\n", "spec"),
        ("dataset: {name: imagefolder, options: {root: /etc}}\n", "dataset.options.root"),
    ],
)
def test_run_rejects_a_bad_spec(tmp_path: Path, yaml_text: str, field: str) -> None:
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml_text)
    result = CliRunner().invoke(app, ["run", str(spec_file)])
    assert result.exit_code == 2
    assert field in result.output


def test_worker_rejects_an_unknown_search(settings: Settings) -> None:
    result = CliRunner().invoke(app, ["worker", "--search", "nope", "--poll-interval", "0.1"])
    assert result.exit_code == 2 and "search" in result.output


def test_a_dataset_path_outside_this_workers_data_roots_fails_the_search(
    sqlite_db: Database,
) -> None:
    """A search stored before the server confined paths (or by another server) still cannot
    make this worker read outside its own data roots."""
    dataset = {"name": "imagefolder", "options": {"root": "/etc"}}
    search = create_search(sqlite_db, quick_spec(trials=3, dataset=dataset))
    assert Worker(_options(search.id)).run() == 0
    failed = _search(sqlite_db, search.id)
    assert failed.state == SearchState.failed
    assert "dataset.options.root" in failed.error and "CBAM_NAS_DATA_ROOTS" in failed.error


def test_a_download_this_worker_may_not_make_fails_the_search(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBAM_NAS_ALLOW_DOWNLOADS", "false")
    get_settings.cache_clear()
    dataset = {"name": "cifar10", "options": {"download": True}}
    search = create_search(sqlite_db, quick_spec(trials=3, dataset=dataset))
    assert Worker(_options(search.id)).run() == 0
    failed = _search(sqlite_db, search.id)
    assert failed.state == SearchState.failed
    assert "dataset.options.download" in failed.error
    assert "CBAM_NAS_ALLOW_DOWNLOADS" in failed.error


def test_missing_dataset_fails_the_search(
    sqlite_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBAM_NAS_DATA_ROOTS", str(tmp_path))
    get_settings.cache_clear()
    dataset = {"name": "cifar10", "options": {"root": str(tmp_path / "nowhere")}}
    search = create_search(sqlite_db, quick_spec(trials=3, dataset=dataset))
    assert Worker(_options(search.id)).run() == 0
    failed = _search(sqlite_db, search.id)
    assert failed.state == SearchState.failed and "nowhere" in failed.error
    rows = _rows(sqlite_db, search.id)
    assert [r.state for r in rows] == [ResultState.failed]
