"""Helpers the tests' modules share: free ports, waiting for a condition, a quick search spec,
and ``cbam-nas serve`` processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from scipy import stats as scipy_stats

from search.spec import SearchSpec

ROOT = Path(__file__).resolve().parent.parent
SERVED_TRIALS = 5
SERVED_SPEC: dict[str, Any] = {
    "name": "served",
    "backbone": "cifar_resnet20",
    "dataset": {
        "name": "synthetic",
        "options": {"size": 16, "num_samples": 256, "num_test": 32},
        "val_fraction": 0.25,
    },
    "space": {"arrangements": ["channel-spatial", "spatial"], "kernel_sizes": [3, 7]},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "sampler": "random",
    "budget": {"trials": SERVED_TRIALS},
    "early_stopping": {"policy": "none"},
    "confirm": {"enabled": False},
}
"""The search of the ``served_search`` fixture (conftest.py)."""


def within_binomial_bounds(false_positives: int, draws: int, rate: float) -> bool:
    """Not above ``rate`` beyond what chance allows (one-sided binomial test at 0.1 %)."""
    return scipy_stats.binomtest(false_positives, draws, rate, alternative="greater").pvalue > 1e-3


def free_port(start: int | None = None) -> int:
    """A port nothing listens on: any (the kernel's pick), or the first free one from ``start``
    (for servers whose port should be recognisable, like a test PostgreSQL)."""
    if start is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    for port in range(start, start + 100):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 99}")


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = 180.0,
    log: Path | None = None,
    interval: float = 0.05,
) -> Any:
    """``predicate()``'s first true value; fails after ``timeout`` s (with ``log``'s tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tail = f":\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")


def quick_spec(
    trials: int = 4, epochs: int = 2, samples: int = 256, **overrides: Any
) -> SearchSpec:
    """A search that trains for seconds: CIFAR ResNet-20 on 16x16 synthetic images, random
    sampler, no early stopping, no confirmation (tests/test_confirmation.py turns it on)."""
    data: dict[str, Any] = {
        "backbone": "cifar_resnet20",
        "dataset": {
            "name": "synthetic",
            "options": {"size": 16, "num_samples": samples, "num_test": 32},
            "val_fraction": 0.25,
        },
        "training": {"epochs": epochs, "batch_size": 32, "lr": 0.05},
        "sampler": "random",
        "budget": {"trials": trials},
        "early_stopping": {"policy": "none"},
        "confirm": {"enabled": False},
    }
    data.update(overrides)
    return SearchSpec.from_dict(data)


@dataclass
class Served:
    """A ``cbam-nas serve`` process: its URL, admin token and state directory."""

    url: str
    token: str
    state: Path
    process: subprocess.Popen[bytes]
    search_id: str = ""

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )


def start_serve(state: Path, env: dict[str, str], workers: int = 1) -> Served:
    """``cbam-nas serve`` on a free port with ``workers`` local workers, ready (``/readyz``)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--workers", str(workers)],
        cwd=state,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, "cbam-nas serve exited"
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, "cbam-nas serve to be ready", timeout=60, interval=0.3)
    except BaseException:
        stop_serve(process)
        raise
    token_file = Path(env.get("CBAM_NAS_TOKEN_FILE", state / ".cbam-nas" / "token"))
    return Served(url, token_file.read_text().strip(), state, process)


def stop_serve(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_search(served: Served, spec: dict[str, Any], timeout: float = 300) -> str:
    """Submit ``spec`` to ``served`` and wait until the search has completed; its id."""
    with served.api() as client:
        created = client.post("/searches", json=spec)
        assert created.status_code == 201, created.text
        search_id = created.json()["id"]
        wait_until(
            lambda: client.get(f"/searches/{search_id}").json()["state"] == "completed",
            "the search to complete",
            timeout=timeout,
            interval=1.0,
        )
    return search_id


def run_worker_to_the_end(search_id: str) -> None:
    """The real worker on one thread, in this process, until the search has nothing left to
    run; torch's thread count is restored after."""
    import torch

    from workers.options import WorkerOptions
    from workers.worker import Worker

    threads = torch.get_num_threads()
    try:
        options = WorkerOptions(search_id=search_id, latency_repeats=1, threads=1)
        assert Worker(options).run() == 0
    finally:
        torch.set_num_threads(threads)


def flat(text: str) -> str:
    """Command-line output without rich's box drawing and line wrapping."""
    return " ".join(text.replace("│", " ").replace("┃", " ").split())


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"
)
ON_CUDA = pytest.param("cuda", marks=requires_cuda)
"""A ``device`` parameter that runs where there is a GPU."""


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make torch report ``count`` CUDA devices (for code that only asks how many there are)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
