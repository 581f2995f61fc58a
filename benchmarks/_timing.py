"""Interleaved timing shared by the benchmark scripts: every candidate runs once per round, in
turn, so that a slow spell on a shared machine hits all of them alike; medians are reported."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from workers.train import tune_allocator


def machine() -> str:
    """One line naming the hardware and software a table was measured on."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}; python {platform.python_version()}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median wall time in milliseconds of each candidate, measured round-robin."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def parse_args(parser: argparse.ArgumentParser, rounds: int) -> argparse.Namespace:
    """The flags every timing script takes (--rounds, --threads, --device, --default-malloc),
    applied.

    The process's allocator is set up as a trial's is (``workers.train.tune_allocator``) unless
    ``--default-malloc``: every candidate runs in this one process, so ours and its peers get the
    same allocator either way. Left at glibc's default, whichever candidate frees the largest
    block first decides (through glibc's sliding mmap threshold) whether the others' multi-MB
    tensors page-fault in on every call.
    """
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's allocator at its defaults instead of a trial's setting",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    args.allocator = (
        "glibc defaults"
        if args.default_malloc or not tune_allocator()
        else ("glibc keeping freed memory, as in trials")
    )
    return args
