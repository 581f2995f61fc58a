"""A trial that trains: its data, its overhead measured on the worker's device, the training
with early stopping at each epoch boundary, and its artifacts.

This is where a worker loads torch: a dry-run worker (:mod:`workers.dry_run`) never imports this
module, and starts in a fraction of the time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from optuna.trial import TrialState
from sqlalchemy import select

from search.bundle import model_card
from search.datasets import check_download, check_path, check_paths
from search.errors import InvalidValue
from search.overhead import OverheadReport, measure
from search.results.queries import rung_accuracies
from search.spec import SearchSpec
from search.store.models import OVERHEAD_FIELDS, ResultState, Search, SearchState, utcnow
from search.study.early_stopping import EpochContext, NoStopping, early_stopping_policy
from search.study.objectives import objective_values
from workers.artifacts import store_artifacts, validation_samples
from workers.data import DatasetNotFound, DatasetTensors, StreamingData, load_dataset
from workers.queue import update_row
from workers.train import EpochReport, StopTraining, TrainResult, TrialFailed, train
from workers.trial import CANCELLED_REASON, STOPPED_REASON, Outcome, SearchFailed, TrialContext

log = logging.getLogger("cbam_nas.worker")


def evaluate(ctx: TrialContext) -> Outcome:
    """Measure and train ``ctx``'s architecture; an over-budget one is measured only."""
    spec = ctx.claim.spec
    data = _data(ctx, spec)
    options = ctx.options
    overhead = measure(
        ctx.architecture,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.image_size,
        device=ctx.device,
        batch_size=options.latency_batch,
        repeats=options.latency_repeats,
        warmup=min(3, options.latency_repeats),
    )
    figures = {k: getattr(overhead, k) for k in OVERHEAD_FIELDS}
    update_row(ctx.db, ctx.claim.row_id, val_images=data.sizes[1], **figures)
    constraint = ctx.constraint(figures)
    if constraint is not None and constraint > 0:
        log.info(
            "%s %s: over the overhead budget by %.2f points, not trained",
            ctx.claim.label,
            ctx.architecture.describe(),
            constraint,
        )
        return Outcome(ResultState.over_budget, optuna_state=TrialState.PRUNED)
    ctx.progress.start(f"{ctx.claim.label} {ctx.architecture.describe()}", ctx.training.epochs)
    try:
        result = train(
            ctx.architecture,
            data,
            ctx.training,
            seed=ctx.seed,
            device=ctx.device,
            on_epoch=_on_epoch(ctx, data),
            threads=options.threads,
            backbone_weights=_backbone_weights(ctx, spec),
        )
    except TrialFailed as exc:
        log.warning("%s failed: %s", ctx.claim.label, exc.reason)
        return Outcome(ResultState.failed, exc.reason)
    except InvalidValue as exc:  # the spec's weights file does not fit: no trial of it can run
        raise SearchFailed(str(exc)) from exc
    return _finish(ctx, overhead, result, data)


def _backbone_weights(ctx: TrialContext, spec: SearchSpec) -> str | None:
    """The spec's weights file, checked against this host's data roots."""
    if spec.backbone_weights is None:
        return None
    try:
        check_path("backbone_weights", spec.backbone_weights, ctx.settings.allowed_data_roots)
    except InvalidValue as exc:
        raise SearchFailed(str(exc)) from exc
    return spec.backbone_weights


def _data(ctx: TrialContext, spec: SearchSpec) -> DatasetTensors | StreamingData:
    try:
        # Again here: the search may predate the server's data roots, or this host's differ.
        check_paths(spec.dataset.name, spec.dataset.options, ctx.settings.allowed_data_roots)
        check_download(spec.dataset.options, ctx.settings.allow_downloads)
        return load_dataset(
            spec.dataset.name,
            spec.dataset.options,
            ctx.settings.data_dir,
            spec.dataset.val_fraction,
            spec.seed,
        )
    except (InvalidValue, DatasetNotFound) as exc:
        raise SearchFailed(str(exc)) from exc


def _on_epoch(
    ctx: TrialContext, data: DatasetTensors | StreamingData
) -> Callable[[EpochReport], None]:
    claim, db = ctx.claim, ctx.db
    spec = claim.spec
    # A confirmation run always runs its whole schedule: the race compares whole runs.
    policy = early_stopping_policy(spec) if ctx.trial is not None else NoStopping()
    epochs = ctx.training.epochs
    curve: list[dict[str, Any]] = []

    def search_state() -> SearchState | None:
        with db.session() as session:
            return session.scalar(select(Search.state).where(Search.id == claim.search_id))

    def on_epoch(report: EpochReport) -> None:
        curve.append(report.to_dict())
        best = max(point["val_accuracy"] for point in curve)
        alive = update_row(
            db,
            claim.row_id,
            learning_curve=list(curve),
            epochs_run=report.epoch,
            val_accuracy=best,
            final_val_accuracy=report.val_accuracy,
            heartbeat_at=utcnow(),
        )
        log.info(
            "%s epoch %d/%d: val acc %.4f, train loss %.4f, %.1f s, %.0f img/s",
            claim.label,
            report.epoch,
            epochs,
            report.val_accuracy,
            report.train_loss,
            report.seconds,
            report.images_per_s,
        )
        ctx.progress.advance()
        if not alive:
            raise StopTraining("lost")
        if report.epoch >= epochs:
            return  # the trial is complete: keep its result whatever happens now
        if ctx.stopping.is_set():
            raise StopTraining("shutdown")
        if db.retrying(search_state, what="reading the search") != SearchState.running:
            raise StopTraining("cancelled")
        context = EpochContext(
            ctx.trial,  # type: ignore[arg-type]  # None only with NoStopping
            report.epoch,
            report.val_accuracy,
            lambda: rung_accuracies(db, claim.search_id, report.epoch, claim.row_id),
            val_images=data.sizes[1],
            chance=1 / data.num_classes,
        )
        # References always run to the end (they are the baselines), but are reported to the
        # policy so that Optuna's pruners see them.
        stop = db.retrying(lambda: policy.should_stop(context), what="early stopping")
        if stop and ctx.reference is None:
            raise StopTraining("pruned")

    return on_epoch


def _finish(
    ctx: TrialContext,
    overhead: OverheadReport,
    result: TrainResult,
    data: DatasetTensors | StreamingData,
) -> Outcome:
    figures = {
        "val_accuracy": result.best_val_accuracy,
        "final_val_accuracy": result.final_val_accuracy,
        "test_accuracy": result.test_accuracy,
        "epochs_run": result.epochs_run,
        "wall_time_s": result.wall_time_s,
        "images_per_s": result.images_per_s,
    }
    if result.stopped == "lost":
        log.warning("%s was taken from this worker (heartbeat too old)", ctx.claim.label)
        return Outcome(ResultState.failed, lost=True)
    if result.stopped == "shutdown":
        return Outcome(ResultState.requeued, f"{STOPPED_REASON} (signal)")
    if result.stopped == "cancelled":
        return Outcome(ResultState.failed, CANCELLED_REASON)
    if result.stopped == "pruned":
        return Outcome(ResultState.pruned, optuna_state=TrialState.PRUNED, row=figures)
    samples = None
    try:
        samples = validation_samples(data)
    except Exception:  # the pictures are optional: never lose a trained trial to them
        log.warning("%s: no sample images stored", ctx.claim.label, exc_info=True)
    artifacts = store_artifacts(
        ctx.artifact_store(),
        ctx.trial or ctx.study,
        ctx.architecture,
        result,
        overhead,
        samples,
        db=ctx.db,
        card=_card(ctx, data, result),
    )
    values = (
        objective_values(ctx.claim.spec, result.best_val_accuracy, overhead.to_dict())
        if ctx.trial is not None
        else None
    )
    return Outcome(ResultState.completed, values=values, row={**figures, "artifacts": artifacts})


def _card(
    ctx: TrialContext, data: DatasetTensors | StreamingData, result: TrainResult
) -> dict[str, Any]:
    """The model's card as this trial knows it: the data's shapes, normalisation and class
    names, and the run's figures (the search adds its seeds and evidence when bundling)."""
    spec, claim = ctx.claim.spec, ctx.claim
    train_images, val_images, test_images = data.sizes
    return model_card(
        ctx.architecture,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.image_size,
        mean=data.mean,
        std=data.std,
        class_names=data.class_names,
        dataset=spec.dataset.to_dict(),
        trial={
            "search_id": claim.search_id,
            "number": claim.number,
            "attempt": claim.attempt,
            "phase": claim.phase.value,
            "seed": ctx.seed,
            "epochs": ctx.training.epochs,
            "epochs_run": result.epochs_run,
        },
        metrics={
            "val_accuracy": result.best_val_accuracy,
            "final_val_accuracy": result.final_val_accuracy,
            "test_accuracy": result.test_accuracy,
            "train_images": train_images,
            "val_images": val_images,
            "test_images": test_images,
        },
    )
