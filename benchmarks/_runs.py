"""A table of real training runs that the statistics benchmarks replay searches from.

Racing, the confirmed board and early stopping are pure functions of the runs' accuracies
(``search.study.confirmation.race``, ``search.results.leaderboard.confirmed_board``,
``search.study.early_stopping``), so a benchmark that asks "how often would a search say X" can
train each (architecture, seed, schedule) once, with the worker's own training function
(``workers.train.train`` on ``workers.data.load_dataset``), and replay as many searches as it
likes over the table, as tabular NAS benchmarks do. The runs are cached in
``.cbam-nas/benchmark-runs.jsonl`` (keyed by everything that shapes them), so the three
benchmarks that share a setting train it once.

Every run: cluttered digits (the demo's data, smaller), CIFAR ResNet-20, the demo's optimiser,
the validation split fixed by seed 0 (as in one search), the training seed as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from search.results.leaderboard import Board, confirmed_board
from search.space import Architecture, reference_architectures
from search.spec import SearchSpec, TrainingSpec
from search.study.confirmation import Arm, arms, confirm_seed, race

BACKBONE = "cifar_resnet20"
CACHE = Path(".cbam-nas") / "benchmark-runs.jsonl"


def cbam(**knobs: Any) -> Architecture:
    """A CBAM variant of the backbone: the paper's module with ``knobs`` changed."""
    return Architecture(BACKBONE, "cbam", **knobs)


REFERENCES = reference_architectures(BACKBONE)
# The paper's ablations (Woo et al. 2018, tables 1 and 3), each as a change to its CBAM.
POOLING = {
    "avg": cbam(pool_types=("avg",)),
    "max": cbam(pool_types=("max",)),
    "avg+max": REFERENCES["cbam"],
}
ARRANGEMENT = {
    "channel→spatial": REFERENCES["cbam"],
    "spatial→channel": cbam(arrangement="spatial-channel"),
    "parallel": cbam(arrangement="parallel"),
}
VARIANTS = [POOLING["avg"], POOLING["max"], ARRANGEMENT["spatial→channel"], ARRANGEMENT["parallel"]]
"""The CBAM variants that are not a reference: the space the replayed explorations search."""
ALL = [*REFERENCES.values(), *VARIANTS]


@dataclass(frozen=True)
class Setting:
    """What every run of a table shares: the data and the training schedule."""

    num_train: int = 3000
    num_test: int = 300
    canvas: int = 24
    clutter: int = 2
    val_fraction: float = 0.2
    lr: float = 0.05
    batch_size: int = 64

    @property
    def val_images(self) -> int:
        return round(self.num_train * self.val_fraction)

    def dataset_options(self) -> dict[str, int]:
        return {
            "num_train": self.num_train,
            "num_test": self.num_test,
            "canvas": self.canvas,
            "clutter": self.clutter,
        }

    def describe(self) -> str:
        return (
            f"cluttered digits ({self.canvas} px, clutter {self.clutter}; "
            f"{self.num_train - self.val_images} training, {self.val_images} validation, "
            f"{self.num_test} test images), {BACKBONE}, SGD lr {self.lr}, batch {self.batch_size}"
        )


@dataclass
class Run:
    """One training run, as the worker would record it (``val_accuracy``: the best epoch's)."""

    arch_id: str
    label: str
    seed: int
    epochs: int
    val_accuracy: float
    final_val_accuracy: float
    test_accuracy: float | None
    curve: list[float]
    params: int
    seconds: float
    key: str = field(default="", repr=False)


def _key(setting: Setting, architecture: Architecture, seed: int, epochs: int) -> str:
    text = json.dumps(
        [asdict(setting), architecture.to_dict(), seed, epochs], sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _train(job: tuple[Setting, dict[str, Any], int, int, int]) -> Run:
    """One run in a worker process (``threads`` torch threads)."""
    import torch

    from search.build import build_model
    from workers.data import load_dataset
    from workers.train import train

    setting, arch_dict, seed, epochs, threads = job
    torch.set_num_threads(threads)
    architecture = Architecture.from_dict(arch_dict)
    data = load_dataset(
        "cluttered-digits", setting.dataset_options(), CACHE.parent, setting.val_fraction, 0
    )
    training = TrainingSpec.from_dict(
        {"epochs": epochs, "batch_size": setting.batch_size, "lr": setting.lr, "flip": False}
    )
    result = train(architecture, data, training, seed=seed, threads=threads)
    model = build_model(architecture, data.num_classes, data.in_channels)
    return Run(
        arch_id=architecture.id,
        label=architecture.describe(),
        seed=seed,
        epochs=epochs,
        val_accuracy=result.best_val_accuracy,
        final_val_accuracy=result.final_val_accuracy,
        test_accuracy=result.test_accuracy,
        curve=[r.val_accuracy for r in result.curve],
        params=sum(p.numel() for p in model.parameters()),
        seconds=result.wall_time_s,
        key=_key(setting, architecture, seed, epochs),
    )


class RunTable:
    """The runs of one :class:`Setting`, trained on demand and cached across benchmarks."""

    def __init__(self, setting: Setting, jobs: int = 1, cache: Path = CACHE) -> None:
        self.setting = setting
        self.jobs = jobs
        self.cache = cache
        self._runs: dict[str, Run] = {}
        if cache.exists():
            for line in cache.read_text().splitlines():
                run = Run(**json.loads(line))
                self._runs[run.key] = run

    def ensure(self, plan: Iterable[tuple[Architecture, int, int]]) -> float:
        """Train every (architecture, seed, epochs) of ``plan`` not cached yet; the seconds it
        took. ``jobs`` processes share the machine's cores."""
        missing = [
            (arch, seed, epochs)
            for arch, seed, epochs in dict.fromkeys(plan)
            if _key(self.setting, arch, seed, epochs) not in self._runs
        ]
        if not missing:
            return 0.0
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        jobs = [(self.setting, a.to_dict(), s, e, threads) for a, s, e in missing]
        print(f"training {len(jobs)} runs ({self.jobs} at a time) ...", flush=True)
        start = time.perf_counter()
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(self.jobs) as pool, self.cache.open("a") as out:
            for done, run in enumerate(pool.map(_train, jobs), start=1):
                self._runs[run.key] = run
                out.write(json.dumps(asdict(run)) + "\n")
                out.flush()
                print(
                    f"  {done}/{len(jobs)} {run.label} seed {run.seed}, {run.epochs} epochs: "
                    f"{100 * run.val_accuracy:.1f} % ({run.seconds:.0f} s)",
                    flush=True,
                )
        return time.perf_counter() - start

    def get(self, architecture: Architecture, seed: int, epochs: int) -> Run:
        return self._runs[_key(self.setting, architecture, seed, epochs)]

    def scores(self, architecture: Architecture, seeds: Sequence[int], epochs: int) -> list[float]:
        return [self.get(architecture, s, epochs).val_accuracy for s in seeds]


def board_row(run: Run, architecture: Architecture, val_images: int) -> dict[str, Any]:
    """A run as the confirmed board reads a confirmation run's row."""
    reference = next((name for name, a in REFERENCES.items() if a.id == architecture.id), None)
    return {
        "arch_id": run.arch_id,
        "label": run.label,
        "seed": run.seed,
        "reference": reference,
        "val_accuracy": run.val_accuracy,
        "test_accuracy": run.test_accuracy,
        "params": run.params,
        "val_images": val_images,
        "architecture": architecture.to_dict(),
    }


# -- a search, replayed over the table ------------------------------------------------------------


def search_spec(
    setting: Setting, seed: int, explore_epochs: int, confirm_epochs: int, **confirm: Any
) -> SearchSpec:
    """The spec of a search over the table's space: the paper's CBAM ablated one knob at a
    time (pooling, arrangement); racing as the product's defaults unless ``confirm`` says
    otherwise."""
    return SearchSpec.from_dict(
        {
            "name": f"replayed search (seed {seed})",
            "backbone": BACKBONE,
            "dataset": {
                "name": "cluttered-digits",
                "options": setting.dataset_options(),
                "val_fraction": setting.val_fraction,
            },
            "space": {
                "arrangements": ["channel-spatial", "spatial-channel", "parallel"],
                "pool_types": [["avg", "max"], ["avg"], ["max"]],
            },
            "training": {
                "epochs": explore_epochs,
                "batch_size": setting.batch_size,
                "lr": setting.lr,
                "flip": False,
            },
            "confirm": {"epochs": confirm_epochs, **confirm},
            "seed": seed,
        }
    )


def confirm_seeds(spec: SearchSpec) -> list[int]:
    """The training seeds of every round the spec's race can run."""
    return [confirm_seed(spec, r) for r in range(spec.confirm.max_seeds)]


@dataclass
class Replay:
    """One search replayed over a table: its exploration (every architecture of :data:`ALL`
    once, on the spec's seed: a budget that covers the space, so no sampler plays a part), the
    race over the arms the product would pick, and the confirmed board."""

    spec: SearchSpec
    explored: list[Run]
    arms: list[Arm]
    results: dict[tuple[int, int], float]
    board: Board

    @property
    def winner(self) -> Run:
        """The exploration's most accurate trial, references included (what it puts first)."""
        return max(self.explored, key=lambda r: r.val_accuracy)

    @property
    def best_variant(self) -> Run:
        """The exploration's most accurate CBAM variant (the paper's CBAM included)."""
        return max(
            (r for r, a in zip(self.explored, ALL, strict=True) if a.attention == "cbam"),
            key=lambda r: r.val_accuracy,
        )

    @property
    def confirm_epochs(self) -> int:
        return len(self.results) * self.spec.confirm_epochs

    @property
    def naive_epochs(self) -> int:
        """Every arm on every seed: what a fixed number of seeds would cost."""
        return len(self.arms) * self.spec.confirm.max_seeds * self.spec.confirm_epochs


def replay(table: RunTable, spec: SearchSpec) -> Replay:
    """The search ``spec`` over ``table``; its runs must be in the table already."""
    explore_epochs = spec.training.epochs
    confirm_epochs = spec.confirm_epochs
    explored = [table.get(a, spec.seed, explore_epochs) for a in ALL]
    rows = [
        {**board_row(run, a, table.setting.val_images), "architecture": a.to_dict()}
        for run, a in zip(explored, ALL, strict=True)
    ]
    candidates = arms(spec, rows)
    results: dict[tuple[int, int], float] = {}
    while True:
        state = race(spec, len(candidates), results, len(results))
        if state.finished:
            break
        seed = confirm_seed(spec, state.round)
        for arm in state.active:
            architecture = candidates[arm].architecture
            results[(arm, state.round)] = table.get(architecture, seed, confirm_epochs).val_accuracy
    board_rows = [
        board_row(
            table.get(candidates[arm].architecture, confirm_seed(spec, r), confirm_epochs),
            candidates[arm].architecture,
            table.setting.val_images,
        )
        for arm, r in results
    ]
    board = confirmed_board(board_rows, "params", spec.confirm.alpha, spec.confirm.looks)
    return Replay(spec, explored, candidates, results, board)
