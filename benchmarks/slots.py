"""Several trials per device on CPU: N slots of C/N threads against one slot of C threads.

The demo's search (``examples/cluttered-digits.yaml``: cluttered digits, CIFAR ResNet-20, the
demo's schedule) trimmed to its exploration with every trial run to the end (no early stopping,
no confirmation, the random sampler: each configuration trains the same architectures), run
through ``cbam-nas worker --slots N --exit-when-idle`` on a throwaway SQLite database: one slot
with every core against ``--slots N`` (default: one per core, one thread each). Printed: wall
time, trials completed and completed trials per hour for each, and the ratio.

    python -m benchmarks.slots [--trials 6] [--epochs 5] [--num-train 3000] [--slots N]

About 8 minutes on 2 CPU cores with the defaults; ``--trials 4 --epochs 1 --num-train 500``
checks the plumbing in about a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

from benchmarks._timing import machine
from search.spec import SearchSpec
from search.store.engine import open_database
from search.store.models import ResultState, TrialResult
from search.store.searches import create_search

DEMO = Path(__file__).resolve().parent.parent / "examples" / "cluttered-digits.yaml"


def make_spec(args: argparse.Namespace) -> SearchSpec:
    data: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    data["budget"] = {"trials": args.trials}
    data["training"]["epochs"] = args.epochs
    data["dataset"]["options"]["num_train"] = args.num_train
    data.update(
        early_stopping={"policy": "none"}, confirm={"enabled": False}, sampler="random", seed=0
    )
    return SearchSpec.from_dict(data)


def run(args: argparse.Namespace, slots: int) -> dict[str, float]:
    """The search under ``slots`` worker slots; wall time and completed trials."""
    with tempfile.TemporaryDirectory(prefix="cbam-nas-slots-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        db = open_database(url)
        db.migrate()
        search = create_search(db, make_spec(args))
        env = {
            **os.environ,
            "CBAM_NAS_DATABASE_URL": url,
            "CBAM_NAS_ARTIFACTS_DIR": str(Path(tmp) / "artifacts"),
            "CBAM_NAS_DATA_DIR": str(Path(tmp) / "data"),
        }
        env.pop("OMP_NUM_THREADS", None)
        command = [sys.executable, "-m", "service.cli", "worker", "--search", search.id]
        command += ["--slots", str(slots), "--no-progress", "--latency-repeats", "3"]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        wall = time.perf_counter() - start
        with db.session() as session:
            completed = session.scalar(
                select(func.count()).where(
                    TrialResult.search_id == search.id,
                    TrialResult.state == ResultState.completed,
                )
            )
        db.close()
    return {"wall_s": wall, "completed": completed or 0, "per_hour": 3600 * (completed or 0) / wall}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    print(machine())
    cores = os.cpu_count() or 1
    results = {}
    for slots in (1, args.slots):
        results[slots] = run(args, slots)
        threads = max(1, cores // slots)
        shown = results[slots]
        print(
            f"{slots} slot(s) x {threads} thread(s): {shown['completed']} trials in "
            f"{shown['wall_s']:.0f} s = {shown['per_hour']:.1f} completed trials/hour"
        )
    ratio = results[args.slots]["per_hour"] / results[1]["per_hour"]
    print(
        f"{args.slots} slots / 1 slot: {ratio:.2f}x completed trials per hour "
        f"({args.trials} trials of {args.epochs} epochs, {args.num_train} training images)"
    )
    return results


if __name__ == "__main__":
    main()
