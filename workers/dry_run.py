"""Dry runs: the made-up figures of a worker that coordinates without training.

Dry-run workers (``WorkerOptions.dry_run``, ``cbam-nas worker --dry-run``) go through exactly a
real worker's path (claim, ask, row updates, tell, completion) but record made-up metrics
instead of loading data, measuring and training, after ``WorkerOptions.dry_run_seconds`` of sleep
in place of training, and store no artifacts: load tests and ``benchmarks/coordination.py`` use
them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from optuna.trial import TrialState

from search.space import Architecture
from search.store.models import ResultState
from search.study.objectives import objective_values
from workers.trial import STOPPED_REASON, Outcome, TrialContext

# A dry run's made-up figures of the backbone without attention: params, MACs, latency in ms.
DRY_RUN_BASELINE = (272_474, 40_813_184, 2.0)


def dry_run_figures(
    architecture: Architecture, seed: int | None = None
) -> tuple[float, dict[str, Any]]:
    """The made-up validation accuracy and overheads a dry-run worker records: fixed functions of
    the architecture's id (the same from every worker), overheads 0 % without attention. With a
    confirmation run's ``seed`` the accuracy moves by up to a point, a fixed function of the two
    (as seeds move real runs). Nothing is built, measured or trained."""
    digest = hashlib.sha256(architecture.id.encode()).digest()
    u = [int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 0xFFFF for i in range(4)]
    attends = architecture.attention != "none"
    pct = {
        "params_pct": 0.2 + 4.8 * u[1] if attends else 0.0,
        "macs_pct": 0.1 + 1.9 * u[2] if attends else 0.0,
        "latency_pct": 1.0 + 29.0 * u[3] if attends else 0.0,
    }
    base_params, base_macs, base_latency_ms = DRY_RUN_BASELINE
    figures = {
        "params": round(base_params * (1 + pct["params_pct"] / 100)),
        "macs": round(base_macs * (1 + pct["macs_pct"] / 100)),
        "attention_ops": 0,
        "latency_ms": base_latency_ms * (1 + pct["latency_pct"] / 100),
        "train_step_ms": None,
        "peak_memory_bytes": None,
        **pct,
    }
    accuracy = 0.5 + 0.4 * u[0]
    if seed is not None:
        noise = hashlib.sha256(f"{architecture.id}/{seed}".encode()).digest()
        accuracy += 0.02 * (int.from_bytes(noise[:2], "big") / 0xFFFF - 0.5)
    return accuracy, figures


def evaluate(ctx: TrialContext) -> Outcome:
    """A dry-run trial's end: made-up figures, recorded and told as a trained trial's are,
    after ``dry_run_seconds`` in place of training (a signal meanwhile hands the trial back,
    as at an epoch boundary)."""
    seconds = ctx.options.dry_run_seconds
    if seconds > 0 and ctx.stopping.wait(seconds):
        return Outcome(ResultState.requeued, f"{STOPPED_REASON} (signal)")
    accuracy, figures = dry_run_figures(
        ctx.architecture, None if ctx.trial is not None else ctx.seed
    )
    constraint = ctx.constraint(figures)
    if constraint is not None and constraint > 0:
        return Outcome(ResultState.over_budget, optuna_state=TrialState.PRUNED, row=figures)
    metrics = {"val_accuracy": accuracy, "final_val_accuracy": accuracy}
    values = objective_values(ctx.claim.spec, accuracy, figures)
    row = {"epochs_run": 0, "wall_time_s": seconds, **figures, **metrics}
    return Outcome(ResultState.completed, values=values, row=row)
