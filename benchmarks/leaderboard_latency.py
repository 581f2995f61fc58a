"""Leaderboard and trial-list latency at 10,000 trials: our API against optuna-dashboard's.

One search (CIFAR ResNet-20, synthetic data, TPE, accuracy against parameter overhead) is filled
with 10,000 finished trials in a throwaway SQLite database (``--database URL`` for another, e.g.
PostgreSQL): the Optuna study and our ``trial_results`` rows hold the same trials, written in bulk
rather than trained. Architectures are drawn from the search space through ``SearchSpace.sample``
(so the study's parameters and distributions are those its sampler records), parameter counts and
MACs are those of the attention modules each architecture places, learning curves run 10 epochs;
most trials completed, some pruned (successive-halving rungs) and some failed and re-run, and the
three references (no attention, SE, CBAM) come first, as a worker leaves a finished search.

Ours: the real app (``create_app``) under uvicorn in a background thread, called over HTTP on
one keep-alive connection with an API token: the leaderboard ranked against parameters and
against latency (top 20), and the trial list sorted by validation accuracy (first 50) and paged
at offset 5,000. The peer: optuna-dashboard's own server (its WSGI app under wsgiref, the server
``run_server`` uses) on the same study, opened as ``optuna-dashboard URL`` opens it, in a child
process (the trials it caches would otherwise slow our server's garbage collections). Its UI
builds its trial table and Pareto view from one request, ``GET /api/studies/<id>?after=0``, which
returns every trial: that request is the peer of each of ours. The dashboard keeps a study's
trials in memory for 10 s after reading them, so it is timed twice per round: with that cache
emptied first (it reads the database, as ours does on every request) and with it fresh (warm).

Requests run in interleaved rounds (every request of a round in turn, the peer's every k-th
round as it makes fewer), after a warm-up. Printed: p50 and p95 per request (nearest rank), the
``ours / peer`` medians and how many times faster ours is. Targets: p95 <= 50 ms for each of
ours, and >= 10x faster than optuna-dashboard, cold and warm.

    python -m benchmarks.leaderboard_latency [--trials 10000] [--requests 200]
        [--peer-requests 5] [--database URL] [--add-trials] [--no-intermediate-values]

About 4 minutes on 2 busy CPU cores with the defaults, mostly the peer's requests (10 s cold,
3 s warm, 48 MiB each at 10,000 trials); ``--trials 1000 --requests 50 --peer-requests 3``
checks the plumbing in about 20 seconds. ``--add-trials`` fills the study through
``Study.add_trials`` instead of inserts (the same rows, checked on a sample either way; 10 to
20 ms a trial here). ``optuna-dashboard`` comes with the ``dev`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import httpx
import optuna
import uvicorn
from optuna.distributions import CategoricalDistribution, distribution_to_json
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import insert, select, update

from benchmarks._timing import machine
from search.build import build_model
from search.knobs import CBAMConfig, has_channel_gate, has_spatial_gate
from search.nn.attention import create_attention
from search.nn.backbones import BACKBONES
from search.overhead import (
    attention_elementwise_ops,
    attention_macs,
    count_macs,
    count_params,
)
from search.settings import Settings
from search.space import REFERENCE_NAMES, Architecture
from search.spec import SearchSpec
from search.store.artifacts import ARTIFACT_FILES
from search.store.engine import Database, open_database
from search.store.models import Reference, ResultState, Search, SearchState, TrialResult
from search.store.searches import create_search, delete_search, search_study
from search.study.objectives import objective_values
from search.study.studies import architecture_for
from service.app import create_app
from service.auth import create_token, revoke_token

BACKBONE = "cifar_resnet20"
# The synthetic dataset's defaults: 16x16 RGB images, 4 classes, 512 samples (10% validation).
IMAGE_SIZE, NUM_CLASSES, TRAIN_IMAGES = 16, 4, 461
EPOCHS = 10
# Shares of the sampled trials that were pruned and that failed (then re-run); the rest completed.
PRUNED_SHARE, FAILED_SHARE = 0.12, 0.03
BATCH = 2000
FAILURES = (
    "RuntimeError: CUDA error: an illegal memory access was encountered",
    "worker lost",
    "ValueError: loss is nan",
)
OURS = {
    "leaderboard overhead=params": ("leaderboard", {"overhead": "params", "limit": 20}),
    "leaderboard overhead=latency": ("leaderboard", {"overhead": "latency", "limit": 20}),
    "trials sort=val_accuracy desc": (
        "trials",
        {"sort": "val_accuracy", "order": "desc", "limit": 50},
    ),
    "trials offset=5000": ("trials", {"offset": 5000, "limit": 50}),
}
PEERS = ("study after=0, cache cold", "study after=0, cache warm")
TARGET_P95_MS = 50.0
TARGET_SPEEDUP = 10.0


# -- filling the database ------------------------------------------------------------------------


class _Draw:
    """A stand-in trial for ``SearchSpace.sample``: draws each choice at random and records the
    parameter and its distribution, as the study's sampler records them."""

    _distributions: ClassVar[dict[tuple[str, tuple[Any, ...]], CategoricalDistribution]] = {}

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, CategoricalDistribution] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        key = (name, tuple(choices))
        if key not in self._distributions:
            self._distributions[key] = CategoricalDistribution(list(choices))
        value = choices[self.rng.randrange(len(choices))]
        self.params[name] = value
        self.distributions[name] = self._distributions[key]
        return value


def _cbam_params(config: CBAMConfig, channels: int) -> int:
    """The parameters of ``CBAM(channels, config)``: the gates' MLP, convolutions and BN."""
    params = 0
    if has_channel_gate(config.arrangement):
        hidden = config.hidden_channels(channels)
        params += 2 * channels * hidden + (hidden + channels if config.mlp_bias else 0)
    if has_spatial_gate(config.arrangement):
        maps = 2 if config.spatial_pool == "maxmean" else 1
        params += maps * config.kernel_size**2 + 2 * config.spatial_bn
        params += channels if config.spatial_pool == "conv" else 0
    return params


class _Figures:
    """Parameters, MACs and attention operations of an architecture: the backbone's, counted once,
    plus those of each attention module it places (counted per module kind and width); a latency
    made up from the number of modules."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.info = BACKBONES[BACKBONE]
        baseline = build_model(Architecture(BACKBONE, "none"), NUM_CLASSES)
        self.params = count_params(baseline)
        self.macs = count_macs(baseline, (3, IMAGE_SIZE, IMAGE_SIZE))
        self.latency_ms = 1.9
        self._modules: dict[tuple[Any, ...], tuple[int, int, int]] = {}

    def _module(self, architecture: Architecture, stage: int) -> tuple[int, int, int]:
        config = architecture.cbam_config()
        key = (architecture.attention, architecture.reduction, config, stage)
        if key not in self._modules:
            channels = self.info.stage_channels[stage - 1]
            side = IMAGE_SIZE // 2 ** (stage - 1)
            if config is None:  # SE: count the module, estimate its operations
                module = create_attention("se", channels, None, architecture.reduction or 16)
                hidden = max(1, channels // (architecture.reduction or 16))
                figures = (count_params(module), 2 * channels * hidden, 2 * channels * side**2)
            else:  # CBAM: counted as search.nn.cbam builds it, without building it (thousands)
                shape = (1, channels, side, side)
                figures = (
                    _cbam_params(config, channels),
                    attention_macs(config, shape),
                    attention_elementwise_ops(config, shape),
                )
            self._modules[key] = figures
        return self._modules[key]

    def __call__(self, architecture: Architecture) -> dict[str, Any]:
        params, macs, ops = self.params, self.macs, 0
        slots = architecture.attention_slots()
        for stage, _block in slots:
            p, m, o = self._module(architecture, stage)
            params, macs, ops = params + p, macs + m, ops + o
        latency = self.latency_ms * (1 + 0.035 * len(slots)) * self.rng.lognormvariate(0, 0.04)
        if architecture.attention == "none":
            latency = self.latency_ms
        return {
            "params": params,
            "macs": macs,
            "attention_ops": ops,
            "latency_ms": latency,
            "train_step_ms": None,
            "peak_memory_bytes": None,
            "params_pct": 100.0 * (params - self.params) / self.params,
            "macs_pct": 100.0 * (macs - self.macs) / self.macs,
            "latency_pct": 100.0 * (latency - self.latency_ms) / self.latency_ms,
        }


def _accuracy(rng: random.Random, architecture: Architecture) -> float:
    """A made-up best validation accuracy: CBAM a little better than SE, better than none."""
    base = {"none": 0.835, "se": 0.842, "cbam": 0.846}[architecture.attention]
    if architecture.attention == "cbam":
        base += 0.004 * (architecture.arrangement == "channel-spatial")
        base -= 0.003 * (architecture.blocks != "all")
    return min(0.99, max(0.3, rng.gauss(base, 0.012)))


def _curve(rng: random.Random, target: float, epochs: int) -> list[dict[str, Any]]:
    """A learning curve of ``epochs`` epochs (of EPOCHS) rising towards ``target``."""
    curve = []
    for epoch in range(1, epochs + 1):
        val = target - (target - 0.35) * math.exp(-0.55 * (epoch - 1)) + rng.gauss(0, 0.004)
        seconds = rng.gauss(4.2, 0.3)
        curve.append(
            {
                "epoch": epoch,
                "train_loss": 1.6 * (1 - val) + rng.gauss(0, 0.01),
                "train_accuracy": min(1.0, val + 0.03),
                "val_loss": 1.5 * (1 - val) + rng.gauss(0, 0.01),
                "val_accuracy": min(1.0, max(0.0, val)),
                "lr": 0.05 * (1 + math.cos(math.pi * epoch / EPOCHS)),
                "seconds": seconds,
                "images_per_s": TRAIN_IMAGES / seconds,
            }
        )
    return curve


def _artifacts(completed: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user attribute ``artifacts`` and the system attributes ``upload_artifact`` sets."""
    if not completed:
        return {}, {}
    ids = {name: str(uuid.uuid4()) for name in ARTIFACT_FILES}
    mimetypes = {"weights.safetensors": "application/octet-stream"}
    system = {
        f"artifacts:{aid}": json.dumps(
            {
                "artifact_id": aid,
                "filename": name,
                "mimetype": mimetypes.get(name, "application/json"),
                "encoding": None,
            }
        )
        for name, aid in ids.items()
    }
    return {"artifacts": ids}, system


@dataclass
class Attempt:
    """One attempt at one slot: our row and the Optuna trial it tells (``trial`` None for the
    references, which are asked from the study as a worker asks them)."""

    row: dict[str, Any]
    trial: FrozenTrial | None
    curve: list[dict[str, Any]]


def _row(
    search_id: str,
    number: int,
    attempt: int,
    architecture: Architecture,
    reference: str | None,
    state: ResultState,
    figures: dict[str, Any],
    curve: list[dict[str, Any]],
    artifacts: dict[str, Any],
    started: datetime,
    rng: random.Random,
) -> dict[str, Any]:
    accuracies = [point["val_accuracy"] for point in curve]
    wall = sum(point["seconds"] for point in curve) + rng.uniform(1, 3)
    completed = state == ResultState.completed
    finished = started + timedelta(seconds=wall)
    return {
        "search_id": search_id,
        "number": number,
        "optuna_number": None,
        "attempt": attempt,
        "architecture": architecture.to_dict(),
        "arch_id": architecture.id,
        "label": architecture.describe(),
        "reference": Reference(reference) if reference else None,
        "state": state,
        "val_accuracy": max(accuracies) if accuracies else None,
        "final_val_accuracy": accuracies[-1] if accuracies else None,
        "test_accuracy": max(accuracies) + rng.gauss(-0.005, 0.006) if completed else None,
        **figures,
        "epochs_run": len(curve),
        "wall_time_s": wall,
        "images_per_s": TRAIN_IMAGES * len(curve) / wall,
        "device": "cpu",
        "worker": f"bench-{number % 4}",
        "failure_reason": rng.choice(FAILURES) if state == ResultState.failed else None,
        "learning_curve": curve,
        "artifacts": artifacts.get("artifacts"),
        "heartbeat_at": finished,
        "created_at": started,
        "finished_at": finished,
    }


_OPTUNA_STATE = {
    ResultState.completed: TrialState.COMPLETE,
    ResultState.pruned: TrialState.PRUNED,
    ResultState.failed: TrialState.FAIL,
}


def _frozen(
    spec: SearchSpec,
    draw: _Draw,
    row: dict[str, Any],
    system_attrs: dict[str, Any],
    intermediate: bool,
) -> FrozenTrial:
    state = _OPTUNA_STATE[row["state"]]
    values = (
        objective_values(spec, row["val_accuracy"], row) if state == TrialState.COMPLETE else None
    )
    trial = optuna.trial.create_trial(
        state=state,
        values=values,
        params=draw.params,
        distributions=draw.distributions,
        user_attrs={"artifacts": row["artifacts"]} if row["artifacts"] else {},
        system_attrs=system_attrs,
        intermediate_values=(
            {p["epoch"]: p["val_accuracy"] for p in row["learning_curve"]} if intermediate else {}
        ),
    )
    # Optuna's convention: naive local times.
    trial.datetime_start = row["created_at"].astimezone().replace(tzinfo=None)
    trial.datetime_complete = row["finished_at"].astimezone().replace(tzinfo=None)
    return trial


def _plan(spec: SearchSpec, search_id: str, args: argparse.Namespace) -> list[Attempt]:
    """Every attempt of the search: references, sampled slots, then the re-runs of failures."""
    rng = random.Random(args.seed)
    intermediate = args.intermediate_values
    figures = _Figures(rng)
    start = datetime.now(timezone.utc) - timedelta(days=3)
    references = [Architecture(BACKBONE, "none"), Architecture(BACKBONE, "se", reduction=16)]
    references.append(Architecture(BACKBONE, "cbam"))
    plan: list[Attempt] = []
    retries: list[Attempt] = []
    for number in range(args.trials):
        started = start + timedelta(seconds=11 * number)
        if number < len(REFERENCE_NAMES):
            architecture, reference, draw = references[number], REFERENCE_NAMES[number], None
        else:
            draw = _Draw(rng)
            architecture, reference = spec.space.sample(draw, BACKBONE), None  # type: ignore[arg-type]
        roll = rng.random()
        if reference is not None or roll >= PRUNED_SHARE + FAILED_SHARE:
            state, epochs = ResultState.completed, EPOCHS
        elif roll < PRUNED_SHARE:
            state, epochs = ResultState.pruned, rng.choice((1, 1, 3, 3, 9))
        else:
            state, epochs = ResultState.failed, rng.randrange(0, 4)
        measured = figures(architecture)
        target = _accuracy(rng, architecture)
        pruned_penalty = 0.03 if state == ResultState.pruned else 0.0
        curve = _curve(rng, target - pruned_penalty, epochs)
        user, system = _artifacts(state == ResultState.completed)
        row = _row(
            search_id, number, 0, architecture, reference, state, measured,
            curve, user, started, rng,
        )  # fmt: skip
        trial = None if draw is None else _frozen(spec, draw, row, system, intermediate)
        plan.append(Attempt(row, trial, curve))
        if state == ResultState.failed and draw is not None:
            curve = _curve(rng, target, EPOCHS)
            user, system = _artifacts(True)
            again = started + timedelta(seconds=11 * args.trials)
            retry = _row(
                search_id, number, 1, architecture, None, ResultState.completed, measured,
                curve, user, again, rng,
            )  # fmt: skip
            retries.append(Attempt(retry, _frozen(spec, draw, retry, system, intermediate), curve))
    plan += retries
    for optuna_number, attempt in enumerate(plan):
        attempt.row["optuna_number"] = optuna_number
    return plan


def _tell_references(
    db: Database, search: Search, spec: SearchSpec, plan: list[Attempt], intermediate: bool
) -> None:
    """Ask the enqueued reference trials from the study and tell them, as a worker does."""
    study = search_study(db, search, spec)
    storage = study._storage
    for attempt in plan[: len(REFERENCE_NAMES)]:
        trial = study.ask()
        _architecture, reference = architecture_for(trial, spec)
        assert reference == attempt.row["reference"].value, (reference, attempt.row["reference"])
        user, system = _artifacts(True)
        attempt.row["artifacts"] = user["artifacts"]
        for key, value in system.items():
            storage.set_trial_system_attr(trial._trial_id, key, value)
        trial.set_user_attr("artifacts", user["artifacts"])
        for point in attempt.curve if intermediate else ():
            storage.set_trial_intermediate_value(
                trial._trial_id, point["epoch"], point["val_accuracy"]
            )
        study.tell(trial, objective_values(spec, attempt.row["val_accuracy"], attempt.row))


def _utc_naive(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)


def _insert_trials(
    storage: optuna.storages.RDBStorage, study_id: int, trials: list[tuple[int, FrozenTrial]]
) -> None:
    """Write finished trials into Optuna's tables in one transaction: the rows ``add_trial``
    writes one transaction per trial (10 to 20 ms each here)."""
    from optuna.storages._rdb import models

    def table(model: Any) -> Any:
        return model.__table__

    with storage.engine.begin() as connection:
        connection.execute(
            insert(table(models.TrialModel)),
            [
                {
                    "number": number,
                    "study_id": study_id,
                    "state": trial.state,
                    "datetime_start": _utc_naive(trial.datetime_start),
                    "datetime_complete": _utc_naive(trial.datetime_complete),
                }
                for number, trial in trials
            ],
        )
        numbers = [number for number, _ in trials]
        ids = dict(
            connection.execute(
                select(models.TrialModel.number, models.TrialModel.trial_id).where(
                    models.TrialModel.study_id == study_id,
                    models.TrialModel.number.between(min(numbers), max(numbers)),
                )
            ).all()
        )
        params, values, intermediate, user_attrs, system_attrs = [], [], [], [], []
        for number, trial in trials:
            trial_id = ids[number]
            for name, value in trial.params.items():
                distribution = trial.distributions[name]
                params.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": distribution.to_internal_repr(value),
                        "distribution_json": distribution_to_json(distribution),
                    }
                )
            for objective, value in enumerate(trial.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                values.append(
                    {
                        "trial_id": trial_id,
                        "objective": objective,
                        "value": stored,
                        "value_type": kind,
                    }
                )
            for step, value in trial.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(
                    value
                )
                intermediate.append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                )
            for key, value in trial.user_attrs.items():
                user_attrs.append(
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                )
            for key, value in trial.system_attrs.items():
                system_attrs.append(
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                )
        for model, rows in (
            (models.TrialParamModel, params),
            (models.TrialValueModel, values),
            (models.TrialIntermediateValueModel, intermediate),
            (models.TrialUserAttributeModel, user_attrs),
            (models.TrialSystemAttributeModel, system_attrs),
        ):
            if rows:
                connection.execute(insert(table(model)), rows)


def _check_study(storage: optuna.storages.RDBStorage, study_id: int, plan: list[Attempt]) -> None:
    """Read a sample of trials back through Optuna and compare them with those planned."""
    last = storage.get_trial_id_from_study_id_trial_number(study_id, len(plan) - 1)
    assert storage.get_trial(last).number == len(plan) - 1
    step = max(1, len(plan) // 25)
    for attempt in plan[len(REFERENCE_NAMES) :: step]:
        expected = attempt.trial
        number = attempt.row["optuna_number"]
        got = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
        assert expected is not None
        for name in (
            "state",
            "params",
            "distributions",
            "values",
            "intermediate_values",
            "user_attrs",
            "system_attrs",
        ):
            assert getattr(got, name) == getattr(expected, name), (name, got, expected)


@dataclass
class Filled:
    search_id: str
    study_name: str
    rows: int
    counts: dict[str, int]
    study_seconds: float
    rows_seconds: float


def populate(db: Database, args: argparse.Namespace) -> Filled:
    """Create the search and fill its study and its ``trial_results`` rows."""
    spec = SearchSpec.from_dict(
        {
            "name": "leaderboard latency",
            "backbone": BACKBONE,
            "dataset": {"name": "synthetic"},
            "budget": {"trials": args.trials},
            "seed": args.seed,
        }
    )
    search = create_search(db, spec, max_trials=args.trials)
    plan = _plan(spec, search.id, args)
    storage = db.optuna_storage()
    study_id = storage.get_study_id_from_name(search.study_name)

    start = time.perf_counter()
    _tell_references(db, search, spec, plan, args.intermediate_values)
    sampled = [(a.row["optuna_number"], a.trial) for a in plan if a.trial is not None]
    if args.add_trials:
        study = optuna.search_study(study_name=search.study_name, storage=storage)
        for i in range(0, len(sampled), BATCH):
            study.add_trials([trial for _, trial in sampled[i : i + BATCH]])
    else:
        for i in range(0, len(sampled), BATCH):
            _insert_trials(storage, study_id, sampled[i : i + BATCH])  # type: ignore[arg-type]
    study_seconds = time.perf_counter() - start
    _check_study(storage, study_id, plan)

    start = time.perf_counter()
    rows = [attempt.row for attempt in plan]
    with db.session() as session:
        for i in range(0, len(rows), BATCH):
            session.execute(insert(TrialResult), rows[i : i + BATCH])
        session.execute(
            update(Search)
            .where(Search.id == search.id)
            .values(
                state=SearchState.completed,
                claimed=args.trials,
                started_at=min(r["created_at"] for r in rows),
                finished_at=max(r["finished_at"] for r in rows),
            )
        )
    rows_seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"].value] = counts.get(row["state"].value, 0) + 1
    return Filled(search.id, search.study_name, len(rows), counts, study_seconds, rows_seconds)


# -- servers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_ours(db: Database, settings: Settings) -> Iterator[str]:
    """Our app under uvicorn in a background thread; yields its base URL."""
    app = create_app(settings=settings, db=db)
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on the accepted connections only for such sockets
    # (as uvicorn binds them itself); without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# optuna-dashboard's WSGI app under wsgiref (the server its ``run_server`` uses), on a storage
# opened as its command line opens one, in a process of its own: in ours, the 10,000 trials it
# caches would slow our server's garbage collections. Untimed, before each request:
# ``/__bench__/clear-cache`` empties its trial cache (cold), ``/__bench__/touch-cache`` marks the
# cached trials as just read (warm: they are kept 10 s).
PEER_SERVER = """
import sys
from datetime import datetime
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import optuna_dashboard


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


storage = optuna.storages.RDBStorage(
    sys.argv[1], skip_compatibility_check=True, skip_table_creation=True
)
app = optuna_dashboard.wsgi(storage)


def bench_app(environ, start_response):
    cache = app._inmemory_cache
    if environ["PATH_INFO"] == "/__bench__/clear-cache":
        cache.clear()
    elif environ["PATH_INFO"] == "/__bench__/touch-cache":
        with cache._trials_cache_lock:
            for study_id in cache._trials_last_fetched_at:
                cache._trials_last_fetched_at[study_id] = datetime.now()
    else:
        return app(environ, start_response)
    start_response("204 No Content", [])
    return [b""]


server = make_server("127.0.0.1", 0, bench_app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def serve_peer(url: str) -> Iterator[str]:
    """optuna-dashboard serving the database at ``url`` in a child process; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-c", PEER_SERVER, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        if not port.isdigit():
            process.wait(10)
            raise RuntimeError(f"optuna-dashboard did not start (exit status {process.returncode})")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Timed:
    """One request, timed from sending it to having read the whole response body."""

    name: str
    send: Callable[[], httpx.Response]
    count: int  # timed requests
    every: int = 1  # runs in every ``every``-th round, until it has made ``count``
    before: Callable[[], None] | None = None  # untimed, before each request
    ms: list[float] = field(default_factory=list)
    size: int = 0

    def __call__(self, record: bool = True) -> None:
        if self.before is not None:
            self.before()
        start = time.perf_counter()
        response = self.send()
        elapsed = (time.perf_counter() - start) * 1e3
        if response.status_code != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {response.text[:300]}")
        self.size = len(response.content)
        if record:
            self.ms.append(elapsed)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_rounds(requests: list[Timed], rounds: int, warmup: int) -> None:
    for request in requests:
        for _ in range(warmup if request.every == 1 else 1):
            request(record=False)
    for r in range(rounds):
        for request in requests:
            if r % request.every == 0 and len(request.ms) < request.count:
                request()


def _check_answers(
    client: httpx.Client, peer: httpx.Client, filled: Filled, study_id: int, best: float
) -> None:
    """Both servers serve the same search: counts and the best accuracy agree."""
    board = client.get(f"/api/v1/searches/{filled.search_id}/leaderboard").json()
    assert board["total"] == filled.counts["completed"], (board["total"], filled.counts)
    assert board["entries"][0]["val_accuracy"] == best, (board["entries"][0], best)
    page = client.get(f"/api/v1/searches/{filled.search_id}/trials", params={"limit": 1}).json()
    assert page["total"] == filled.rows, (page["total"], filled.rows)
    detail = peer.get(f"/api/studies/{study_id}", params={"after": 0}).json()
    assert len(detail["trials"]) == filled.rows, (len(detail["trials"]), filled.rows)
    complete = [t["values"][0] for t in detail["trials"] if t["state"] == "Complete"]
    assert len(complete) == filled.counts["completed"], (len(complete), filled.counts)
    assert max(complete) == best, (max(complete), best)


@contextlib.contextmanager
def serving_ours(db: Database, tmp: Path, trials: int) -> Iterator[tuple[str, str]]:
    """Our app (``serve_ours``) on the filled database, with a fresh API token: (its URL, the
    token). The token is revoked afterwards."""
    token_name = f"bench-{uuid.uuid4().hex[:8]}"
    token = create_token(db, token_name)
    settings = Settings(
        database_url=db.url,
        artifacts_dir=tmp / "artifacts",
        cache_dir=tmp / "cache",
        max_trials_per_search=max(trials, 1000),
    )
    try:
        with serve_ours(db, settings) as url:
            yield url, token
    finally:
        revoke_token(db, token_name)


def benchmark(db: Database, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    filled = populate(db, args)
    populate_s = time.perf_counter() - start
    study_id = db.optuna_storage().get_study_id_from_name(filled.study_name)
    with db.session() as session:
        best = session.scalar(
            select(TrialResult.val_accuracy)
            .where(
                TrialResult.search_id == filled.search_id,
                TrialResult.state == ResultState.completed,
            )
            .order_by(TrialResult.val_accuracy.desc())
            .limit(1)
        )
    with (
        serving_ours(db, tmp, args.trials) as (ours_url, token),
        serve_peer(db.url) as peer_url,
        httpx.Client(
            base_url=ours_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        ) as client,
        httpx.Client(base_url=peer_url, timeout=600) as peer,
    ):
        _check_answers(client, peer, filled, study_id, best)
        requests: list[Timed] = []
        for name, (path, params) in OURS.items():
            url = f"/api/v1/searches/{filled.search_id}/{path}"
            send = partial(client.get, url, params=params)
            requests.append(Timed(name, send, args.requests))
        every = max(1, args.requests // max(1, args.peer_requests))
        rounds = max(args.requests, every * args.peer_requests)
        detail = f"/api/studies/{study_id}"
        cold, warm = (
            Timed(name, lambda: peer.get(detail, params={"after": 0}), args.peer_requests, every)
            for name in PEERS
        )
        cold.before = lambda: peer.get("/__bench__/clear-cache").raise_for_status()
        warm.before = lambda: peer.get("/__bench__/touch-cache").raise_for_status()
        requests += [cold, warm]
        run_rounds(requests, rounds, args.warmup)
    return {"filled": filled, "populate_s": populate_s, "requests": requests}


# -- report --------------------------------------------------------------------------------------


def report(result: dict[str, Any], db: Database, args: argparse.Namespace) -> bool:
    import optuna_dashboard

    filled: Filled = result["filled"]
    requests: list[Timed] = result["requests"]
    ours = [r for r in requests if r.name in OURS]
    peers = [r for r in requests if r.name in PEERS]
    counts = ", ".join(f"{n:,} {state}" for state, n in sorted(filled.counts.items()))
    print(
        f"leaderboard latency: {args.trials:,} trials ({filled.rows:,} attempts: {counts}) in "
        f"{db.dialect}; cbam-nas API (FastAPI, uvicorn {uvicorn.__version__}) vs optuna-dashboard "
        f"{optuna_dashboard.__version__} (wsgiref) on the same study; {machine()}"
    )
    how = "bulk inserts" if not args.add_trials else "Study.add_trials"
    print(
        f"populate: {result['populate_s']:.1f} s (study {filled.study_seconds:.1f} s by {how}, "
        f"trial_results {filled.rows_seconds:.1f} s by bulk inserts)"
    )
    print(f"{'request':<42}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'KiB':>9}")
    for r in requests:
        label = ("ours  " if r in ours else "peer  ") + r.name
        p50, p95, kib = statistics.median(r.ms), percentile(r.ms, 95), r.size / 1024
        print(f"{label:<42}{len(r.ms):>5}{p50:>10.1f}{p95:>10.1f}{kib:>9.0f}")
    print("peer request: GET /api/studies/<id>?after=0 (every trial; its UI pages and ranks them)")
    speedups: list[float] = []
    for peer in peers:
        peer_p50 = statistics.median(peer.ms)
        print(f"ours / peer ({peer.name}), medians:")
        for r in ours:
            p50 = statistics.median(r.ms)
            speedups.append(peer_p50 / p50)
            print(
                f"  {r.name:<32} {p50:7.1f} / {peer_p50:7.1f} ms = {p50 / peer_p50:.3f} "
                f"(ours is {peer_p50 / p50:.0f}x faster)"
            )
    worst = max(ours, key=lambda r: percentile(r.ms, 95))
    worst_p95 = percentile(worst.ms, 95)
    latency_ok = worst_p95 <= TARGET_P95_MS
    speed_ok = min(speedups) >= TARGET_SPEEDUP
    print(
        f"target p95 <= {TARGET_P95_MS:.0f} ms: {'PASS' if latency_ok else 'FAIL'} "
        f"(slowest: {worst.name}, p95 {worst_p95:.1f} ms)"
    )
    print(
        f"target >= {TARGET_SPEEDUP:.0f}x faster than optuna-dashboard: "
        f"{'PASS' if speed_ok else 'FAIL'} (smallest: {min(speedups):.0f}x)"
    )
    return latency_ok and speed_ok


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per endpoint")
    parser.add_argument(
        "--peer-requests",
        type=int,
        default=5,
        help="timed requests of each peer variant (each takes seconds at 10,000 trials)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--database", default=None, help="a database URL (default: a temporary SQLite file)"
    )
    parser.add_argument(
        "--add-trials",
        action="store_true",
        help="fill the study with Study.add_trials (minutes at 10,000 trials) instead of inserts",
    )
    parser.add_argument(
        "--intermediate-values",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record each epoch's accuracy as an Optuna intermediate value",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.trials < len(REFERENCE_NAMES) + 1:
        parser.error(f"--trials must be at least {len(REFERENCE_NAMES) + 1}")
    return run(args, benchmark, report)


def run(
    args: argparse.Namespace,
    measure: Callable[[Database, Path, argparse.Namespace], dict[str, Any]],
    show: Callable[[dict[str, Any], Database, argparse.Namespace], bool],
) -> bool:
    """Measure on ``args.database`` (default: a temporary SQLite file), print, and remove the
    search the benchmark filled; returns whether the targets were met."""
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with tempfile.TemporaryDirectory(prefix="cbam-nas-bench-") as tmp:
        url = args.database or f"sqlite:///{Path(tmp) / 'bench.db'}"
        db = open_database(url)
        try:
            db.migrate()
            result = measure(db, Path(tmp), args)
            ok = show(result, db, args)
            if args.database:
                delete_search(db, result["filled"].search_id)
        finally:
            db.close()
    return ok


if __name__ == "__main__":
    main()
