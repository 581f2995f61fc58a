"""The GPU path through the database and the service: a worker trial on ``cuda:N``, and local
workers spread over the GPUs. Apart from tests/test_gpu.py, whose checks need torch only (the GPU
box runs that file with ``--noconftest``: it has neither SQLAlchemy nor the service's packages).
"""

from __future__ import annotations

import pytest
import torch
from support import fake_gpus, requires_cuda

from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import ResultState, TrialResult
from search.store.searches import create_search
from service.server import worker_devices
from workers.options import WorkerOptions
from workers.worker import Worker


@requires_cuda
def test_worker_runs_a_trial_on_a_gpu(sqlite_db: Database) -> None:
    run_one_trial(sqlite_db, f"cuda:{torch.cuda.device_count() - 1}")


def run_one_trial(db: Database, device: str) -> None:
    """A worker on ``device`` runs a one-trial search to completion: measured and trained there."""
    spec = SearchSpec.from_dict(
        {
            "backbone": "cifar_resnet20",
            "dataset": {
                "name": "synthetic",
                "options": {"size": 16, "num_samples": 256, "num_test": 32},
                "val_fraction": 0.25,
            },
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "sampler": "random",
            "budget": {"trials": 1},
            "confirm": {"enabled": False},
            "early_stopping": {"policy": "none"},
        }
    )
    search = create_search(db, spec)
    options = WorkerOptions(search_id=search.id, device=device, max_trials=1, latency_repeats=3)
    assert Worker(options).run() == 0
    with db.session() as session:
        (row,) = session.query(TrialResult).filter_by(search_id=search.id).all()
        assert row.state == ResultState.completed, row.failure_reason
        assert row.device == device
        assert row.latency_ms > 0 and row.images_per_s > 0 and row.epochs_run == 1
        assert row.val_accuracy is not None and row.artifacts is not None


@pytest.mark.parametrize(
    ("gpus", "device", "workers", "expected"),
    [
        (0, "auto", None, ["cpu"]),
        (0, "auto", 2, ["cpu", "cpu"]),
        (3, "auto", None, ["cuda:0", "cuda:1", "cuda:2"]),
        (2, "auto", 3, ["cuda:0", "cuda:1", "cuda:0"]),
        (2, "cuda", 5, ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]),
        (2, "cuda", None, ["cuda:0"]),
        (4, "cuda:2", 2, ["cuda:2", "cuda:2"]),
        (4, "cpu", None, ["cpu"]),
    ],
)
def test_worker_devices_spread_workers_over_gpus(
    monkeypatch: pytest.MonkeyPatch,
    gpus: int,
    device: str,
    workers: int | None,
    expected: list[str],
) -> None:
    fake_gpus(monkeypatch, gpus)
    assert worker_devices(device, workers) == expected


@requires_cuda
def test_worker_devices_one_per_gpu_here() -> None:
    count = torch.cuda.device_count()
    assert worker_devices("auto", None) == [f"cuda:{i}" for i in range(count)]
