"""Helpers the tests' modules share: free ports, waiting for a condition, a quick search spec."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search.spec import SearchSpec


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
    sampler, no early stopping."""
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
    }
    data.update(overrides)
    return SearchSpec.from_dict(data)
