"""How a worker runs: its database, device, search, timings and whether it trains at all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerOptions:
    """How a worker runs. ``None`` for ``database_url``/``artifacts_dir`` means the settings'."""

    database_url: str | None = None
    artifacts_dir: Path | None = None
    device: str = "cpu"
    search_id: str | None = None
    max_trials: int | None = None
    name: str | None = None
    grace_period_s: float = 60.0
    heartbeat_interval_s: float = 10.0
    poll_interval_s: float = 2.0
    exit_when_idle: bool = False
    latency_batch: int = 1
    latency_repeats: int = 15
    threads: int | None = None
    progress: bool = False
    dry_run: bool = False
    """Coordination only: claim, ask and tell with made-up metrics
    (:func:`workers.dry_run.dry_run_figures`) without loading data, measuring or training; no
    artifacts; ``device`` is recorded, not checked or used. For load tests and
    ``benchmarks/coordination.py``, never for a real search."""
    dry_run_seconds: float = 0.0
    """With ``dry_run``: how long each trial holds the worker in place of training (a sleep, no
    CPU; heartbeats and signals as in training), so that workers stand in for GPU workers."""
