"""Early stopping on vs off: the best validation accuracy a search reaches and the epochs it spends.

One fixed search on cluttered digits (32x32 canvases, 2 fragments of clutter), CIFAR ResNet-20, a
narrowed CBAM space and the random sampler (seeded per slot, so both runs draw the same
architectures), run twice through the real worker in a throwaway SQLite database: without early
stopping, and with successive halving (rungs at 1 and 3 epochs, reduction factor 3, judged once 3
trials reached a rung). The references (no attention, SE, the paper's CBAM) are among the trials
and always run to the end. Training is deterministic on CPU, so a trial that is not stopped
reaches the same accuracy in both runs: a lower best accuracy with early stopping means the
policy stopped the winner.

Printed side by side: trials completed and pruned, epochs spent, best validation accuracy (with
its binomial standard error on the validation set) and the ratio of epochs. Target: the same best
accuracy within noise for <= 50% of the epochs.

    python -m benchmarks.search_efficiency [--trials 16] [--epochs 6] [--num-train 1500]
        [--device cpu] [--threads N]

About 8 minutes on 2 CPU cores with the defaults; ``--trials 6 --epochs 3 --num-train 500``
checks the plumbing in about a minute.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from benchmarks._timing import machine
from search.settings import get_settings
from search.spec import SearchSpec
from search.store.engine import open_database
from search.store.models import ResultState, TrialResult
from search.store.searches import create_search
from workers.options import WorkerOptions
from workers.worker import Worker

POLICIES = ("none", "halving")
SPACE = {
    "arrangements": ["channel-spatial", "channel", "spatial"],
    "reductions": [4, 16],
    "pool_types": [["avg"], ["avg", "max"]],
    "kernel_sizes": [3, 7],
    "blocks": ["all", "last"],
}


@dataclass
class Outcome:
    policy: str
    completed: int
    pruned: int
    epochs: int
    best_accuracy: float
    best_label: str
    val_images: int
    seconds: float

    @property
    def stderr_points(self) -> float:
        p = self.best_accuracy
        return 100 * math.sqrt(p * (1 - p) / max(1, self.val_images))


def make_spec(args: argparse.Namespace, policy: str) -> SearchSpec:
    return SearchSpec.from_dict(
        {
            "name": f"search efficiency ({policy})",
            "backbone": "cifar_resnet20",
            "dataset": {
                "name": "cluttered-digits",
                "options": {
                    "canvas": 32,
                    "clutter": 2,
                    "num_train": args.num_train,
                    "num_test": 200,
                },
                "val_fraction": 0.2,
            },
            "space": SPACE,
            # Digits: random crops, no flips.
            "training": {"epochs": args.epochs, "batch_size": 64, "lr": 0.1, "flip": False},
            "budget": {"trials": args.trials},
            "confirm": {"enabled": False},
            "sampler": "random",
            "early_stopping": {
                "policy": policy,
                "min_epochs": 1,
                "reduction_factor": 3,
                "min_trials_at_rung": 3,
            },
            "seed": args.seed,
        }
    )


def run_search(args: argparse.Namespace, policy: str) -> Outcome:
    db = open_database()
    db.migrate()
    spec = make_spec(args, policy)
    search = create_search(db, spec)
    options = WorkerOptions(
        device=args.device,
        search_id=search.id,
        latency_repeats=3,
        threads=args.threads,
        name=f"bench-{policy}",
    )
    start = time.perf_counter()
    Worker(options).run()
    seconds = time.perf_counter() - start
    with db.session() as session:
        rows = session.scalars(select(TrialResult).where(TrialResult.search_id == search.id)).all()
    db.close()
    completed = [r for r in rows if r.state == ResultState.completed]
    best = max(completed, key=lambda r: r.val_accuracy)
    val_images = round(args.num_train * spec.dataset.val_fraction)
    return Outcome(
        policy=policy,
        completed=len(completed),
        pruned=sum(r.state == ResultState.pruned for r in rows),
        epochs=sum(r.epochs_run for r in rows),
        best_accuracy=best.val_accuracy,
        best_label=best.label,
        val_images=val_images,
        seconds=seconds,
    )


def report(outcomes: dict[str, Outcome], args: argparse.Namespace) -> None:
    print(
        f"search efficiency: {args.trials} trials x {args.epochs} epochs, cluttered digits "
        f"({args.num_train} images), cifar_resnet20, random sampler; {machine()}"
    )
    header = f"{'early stopping':<15}{'completed':>10}{'pruned':>8}{'epochs':>8}"
    header += f"{'best val acc':>16}{'time':>9}  best architecture"
    print(header)
    for o in outcomes.values():
        accuracy = f"{100 * o.best_accuracy:.2f} ± {o.stderr_points:.1f}"
        print(
            f"{o.policy:<15}{o.completed:>10}{o.pruned:>8}{o.epochs:>8}{accuracy:>16}"
            f"{o.seconds:>8.0f}s  {o.best_label}"
        )
    off, on = outcomes["none"], outcomes["halving"]
    ratio = on.epochs / max(1, off.epochs)
    delta = 100 * (on.best_accuracy - off.best_accuracy)
    noise = math.hypot(on.stderr_points, off.stderr_points)
    verdict = "within noise" if abs(delta) <= 2 * noise else "outside noise"
    print(
        f"epochs halving / none = {on.epochs} / {off.epochs} = {ratio:.2f} (target <= 0.50); "
        f"best accuracy {delta:+.2f} points ({verdict}: 2 sigma = {2 * noise:.1f})"
    )


def main(argv: list[str] | None = None) -> dict[str, Outcome]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--verbose", action="store_true", help="log every epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
    )
    outcomes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cbam-nas-bench-") as tmp:
        os.environ["CBAM_NAS_DATABASE_URL"] = f"sqlite:///{Path(tmp) / 'bench.db'}"
        os.environ["CBAM_NAS_ARTIFACTS_DIR"] = str(Path(tmp) / "artifacts")
        get_settings.cache_clear()
        for policy in POLICIES:
            outcomes[policy] = run_search(args, policy)
    get_settings.cache_clear()
    report(outcomes, args)
    return outcomes


if __name__ == "__main__":
    main()
