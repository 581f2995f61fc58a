"""The worker: claim a trial, ask the study, measure, train, tell, store the artifacts; repeat.

Claims. A new slot of a search's budget is claimed by one conditional update,
``claimed = claimed + 1 WHERE claimed < budget_trials``, in the transaction that inserts the
slot's trial-result row, so that the budget is never exceeded however many workers race. A slot
whose attempt was handed back (``requeued``: its worker died or was stopped) or failed is run
again as attempt + 1 without a new slot; inserting that row is the claim, made atomic by the
unique (search, number, attempt) constraint. A requeued attempt runs again with the same Optuna
parameters (:func:`search.study.retry_trial`), a failed one (e.g. a diverging loss) draws anew;
retries are bounded by ``budget.max_retries`` (hand-backs by a signal do not count). Among the
searches with work, a worker takes the one with the fewest trials in flight relative to its budget.

Liveness. Each trial row's ``heartbeat_at`` is refreshed every ``heartbeat_interval_s`` by a
background thread and at every epoch. Any worker sweeps rows whose heartbeat is older than its
``grace_period_s``: the attempt is requeued ("worker lost"), its Optuna trial failed, and the slot
runs again. A worker that finds its own row swept stops that trial. SIGTERM/SIGINT stop training
at the next epoch boundary, hand the trial back at once (requeued, "worker stopped") and end the
worker with status 0. A cancelled search is noticed at the next epoch boundary.

A search is completed, in one conditional update, once every slot is claimed (or its wall-clock
budget has passed), no trial is running and no retry is pending.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import ColumnElement, and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import aliased

from search.artifacts import ARTIFACT_FILES, SAMPLES_FILE, artifact_store
from search.attention_maps import NORMALISATION
from search.db import Database, open_database
from search.errors import InvalidValue
from search.overhead import OverheadReport, check_device, measure
from search.records import ResultState, Search, SearchState, TrialResult, WorkerSeen, utcnow
from search.settings import Settings, get_settings
from search.space import Architecture
from search.spec import SearchSpec
from search.study import (
    EpochContext,
    architecture_for,
    constraint_value,
    early_stopping_policy,
    frozen_trial,
    load_study,
    objective_values,
    retry_trial,
    set_constraint,
)
from workers.data import DatasetNotFound, DatasetTensors, StreamingData, load_dataset
from workers.train import EpochReport, StopTraining, TrainResult, TrialFailed, train

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("cbam_nas.worker")

ARTIFACTS_ATTR = "artifacts"
SAMPLE_IMAGES = 8
"""How many validation images are stored with each completed trial (the dashboard's attention
pictures are computed from them)."""
LOST_REASON = "worker lost"
STOPPED_REASON = "worker stopped"
CANCELLED_REASON = "search cancelled"
FINISHED_SEARCH_STATES = (SearchState.completed, SearchState.cancelled, SearchState.failed)
_ACTIVE_SEARCH_STATES = (SearchState.queued, SearchState.running)
# The columns of an OverheadReport that a trial-result row keeps.
_OVERHEAD_COLUMNS = (
    "params",
    "macs",
    "attention_ops",
    "latency_ms",
    "train_step_ms",
    "peak_memory_bytes",
    "params_pct",
    "macs_pct",
    "latency_pct",
)


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


@dataclass
class Claim:
    """One attempt this worker holds. ``retry_of`` is the Optuna number whose parameters the
    attempt re-runs (None: ask the study)."""

    search_id: str
    study_name: str
    spec: SearchSpec
    row_id: int
    number: int
    attempt: int
    retry_of: int | None = None
    label: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.label = f"search {self.search_id[:8]} trial {self.number}.{self.attempt}"


class SearchFailed(Exception):
    """The search cannot run at all (e.g. its dataset is missing): fail the search, not a trial."""


# -- claims, retries, completion ----------------------------------------------------------


def _counts_against_retries(row: Any) -> ColumnElement[bool]:
    return or_(
        row.state == ResultState.failed,
        and_(row.state == ResultState.requeued, row.failure_reason.like(f"{LOST_REASON}%")),
    )


def pending_retries(search_id: str, max_retries: int) -> Any:
    """The select of the search's attempts that should run again: requeued or failed, without a
    next attempt yet, with retries left."""
    row, later, counted = (aliased(TrialResult) for _ in range(3))
    has_next = exists().where(
        later.search_id == row.search_id,
        later.number == row.number,
        later.attempt == row.attempt + 1,
    )
    failures = (
        select(func.count())
        .where(
            counted.search_id == row.search_id,
            counted.number == row.number,
            _counts_against_retries(counted),
        )
        .scalar_subquery()
    )
    return (
        select(row)
        .where(
            row.search_id == search_id,
            row.state.in_([ResultState.requeued, ResultState.failed]),
            ~has_next,
            failures <= max_retries,
        )
        .order_by(row.number)
    )


def _deadline_passed(search: Search, spec: SearchSpec) -> bool:
    limit = spec.budget.wall_clock_s
    if limit is None or search.started_at is None:
        return False
    return utcnow() - search.started_at > timedelta(seconds=limit)


def maybe_complete(db: Database, search_id: str) -> bool:
    """Mark the search completed if nothing is left to run; True if this call did."""
    with db.session() as session:
        search = session.get(Search, search_id)
        if search is None or search.state != SearchState.running:
            return False
        spec = SearchSpec.from_dict(search.spec)
        running = exists().where(
            TrialResult.search_id == search_id, TrialResult.state == ResultState.running
        )
        conditions = [Search.id == search_id, Search.state == SearchState.running, ~running]
        if not _deadline_passed(search, spec):
            pending = pending_retries(search_id, spec.budget.max_retries).exists()
            conditions += [Search.claimed >= Search.budget_trials, ~pending]
        now = utcnow()
        result = session.execute(
            update(Search)
            .where(*conditions)
            .values(state=SearchState.completed, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        done = result.rowcount == 1
    if done:
        log.info("search %s completed", search_id[:8])
    return done


def _new_row(search: Search, number: int, attempt: int, worker: str, device: str) -> TrialResult:
    now = utcnow()
    return TrialResult(
        search_id=search.id,
        number=number,
        attempt=attempt,
        architecture={},
        arch_id="",
        state=ResultState.running,
        device=device,
        worker=worker,
        learning_curve=[],
        heartbeat_at=now,
        created_at=now,
    )


def _claim_retry(
    db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    with db.session() as session:
        candidates = session.scalars(pending_retries(search.id, spec.budget.max_retries)).all()
    for previous in candidates:
        try:
            with db.session() as session:
                row = _new_row(search, previous.number, previous.attempt + 1, worker, device)
                if previous.state == ResultState.requeued:
                    row.architecture, row.arch_id = previous.architecture, previous.arch_id
                    row.label, row.reference = previous.label, previous.reference
                session.add(row)
                session.flush()
                row_id = row.id
        except IntegrityError:
            continue  # another worker took this retry
        same_params = previous.state == ResultState.requeued
        return Claim(
            search.id,
            search.study_name,
            spec,
            row_id,
            previous.number,
            previous.attempt + 1,
            previous.optuna_number if same_params else None,
        )
    return None


def _claim_slot(
    db: Database, search: Search, spec: SearchSpec, worker: str, device: str
) -> Claim | None:
    now = utcnow()
    with db.session() as session:
        result = session.execute(
            update(Search)
            .where(
                Search.id == search.id,
                Search.claimed < Search.budget_trials,
                Search.state.in_(_ACTIVE_SEARCH_STATES),
            )
            .values(
                claimed=Search.claimed + 1,
                state=SearchState.running,
                started_at=func.coalesce(Search.started_at, now),
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return None
        number = session.scalar(select(Search.claimed).where(Search.id == search.id)) - 1
        row = _new_row(search, number, 0, worker, device)
        session.add(row)
        session.flush()
        return Claim(search.id, search.study_name, spec, row.id, number, 0)


def claim_trial(
    db: Database, worker: str, device: str, search_id: str | None = None
) -> Claim | None:
    """Claim the next attempt of the fairest search with work left (see the module docstring)."""
    with db.session() as session:
        query = select(Search).where(Search.state.in_(_ACTIVE_SEARCH_STATES))
        if search_id is not None:
            query = query.where(Search.id == search_id)
        searches = session.scalars(query).all()
        in_flight = dict(
            session.execute(
                select(TrialResult.search_id, func.count())
                .where(TrialResult.state == ResultState.running)
                .group_by(TrialResult.search_id)
            ).all()
        )

    def fairness(search: Search) -> tuple[float, float, float]:
        budget = max(1, search.budget_trials)
        return (in_flight.get(search.id, 0) / budget, search.claimed / budget, random.random())

    for search in sorted(searches, key=fairness):
        spec = SearchSpec.from_dict(search.spec)
        if _deadline_passed(search, spec):
            maybe_complete(db, search.id)
            continue
        claim = _claim_retry(db, search, spec, worker, device) or _claim_slot(
            db, search, spec, worker, device
        )
        if claim is not None:
            return claim
        # Nothing to claim: the search may be over (e.g. its last lost trial is out of retries).
        maybe_complete(db, search.id)
    return None


def tell_failed(db: Database, study_name: str, optuna_number: int | None) -> None:
    """Fail an Optuna trial by number unless it is finished already."""
    if optuna_number is None:
        return
    study = optuna.load_study(study_name=study_name, storage=db.optuna_storage())
    study.tell(optuna_number, state=TrialState.FAIL, skip_if_finished=True)


def sweep_lost(db: Database, grace_period_s: float) -> list[int]:
    """Requeue running attempts whose heartbeat is older than the grace period; returns the row
    ids this call requeued (another worker sweeping at the same time takes the others)."""
    cutoff = utcnow() - timedelta(seconds=grace_period_s)
    with db.session() as session:
        stale = session.execute(
            select(TrialResult.id, TrialResult.optuna_number, Search.study_name)
            .join(Search, Search.id == TrialResult.search_id)
            .where(TrialResult.state == ResultState.running, TrialResult.heartbeat_at < cutoff)
        ).all()
    swept = []
    for row_id, optuna_number, study_name in stale:
        with db.session() as session:
            result = session.execute(
                update(TrialResult)
                .where(
                    TrialResult.id == row_id,
                    TrialResult.state == ResultState.running,
                    TrialResult.heartbeat_at < cutoff,
                )
                .values(
                    state=ResultState.requeued,
                    failure_reason=f"{LOST_REASON}: no heartbeat for {grace_period_s:g} s",
                    finished_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
        if result.rowcount == 1:
            log.warning("trial row %d lost its worker: requeued", row_id)
            tell_failed(db, study_name, optuna_number)
            swept.append(row_id)
    return swept


def _update_row(db: Database, row_id: int, *, only_running: bool = True, **values: Any) -> bool:
    """Set columns of a trial-result row; with ``only_running`` only while it is running.
    Returns whether the row was updated."""
    conditions = [TrialResult.id == row_id]
    if only_running:
        conditions.append(TrialResult.state == ResultState.running)
    with db.session() as session:
        result = session.execute(
            update(TrialResult)
            .where(*conditions)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    return result.rowcount == 1


def _fail_search(db: Database, search_id: str, error: str) -> None:
    now = utcnow()
    with db.session() as session:
        session.execute(
            update(Search)
            .where(Search.id == search_id, Search.state.in_(_ACTIVE_SEARCH_STATES))
            .values(state=SearchState.failed, error=error, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )


# -- artifacts -------------------------------------------------------------------------------


def validation_samples(
    data: DatasetTensors | StreamingData, count: int = SAMPLE_IMAGES
) -> dict[str, Any] | None:
    """The first ``count`` validation images (the test set's when there is no validation set) as
    ``images`` (uint8 NCHW), ``labels`` (int64) and the per-channel ``mean`` and ``std`` (float32,
    [0, 1] units) that training normalises with: ``(images / 255 - mean) / std``. None when
    there are no such images."""
    import torch

    if isinstance(data, StreamingData):
        files = data.val if len(data.val) else data.test
        if files is None or not len(files):
            return None
        decoded = [files[i] for i in range(min(count, len(files)))]
        images = torch.stack([image for image, _ in decoded])
        labels = torch.tensor([label for _, label in decoded], dtype=torch.int64)
    else:
        x, y = data.val_x, data.val_y
        if not len(y) and data.test_x is not None and data.test_y is not None:
            x, y = data.test_x, data.test_y
        if not len(y):
            return None
        images, labels = x[:count], y[:count]
    return {
        "images": images.to(torch.uint8).contiguous().clone(),
        "labels": labels.to(torch.int64).contiguous().clone(),
        "mean": torch.tensor(data.mean, dtype=torch.float32),
        "std": torch.tensor(data.std, dtype=torch.float32),
    }


def store_artifacts(
    store: Any,
    trial: optuna.Trial,
    architecture: Architecture,
    result: TrainResult,
    overhead: OverheadReport,
    samples: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Upload weights, architecture, metrics and (when given) the sample images of
    :func:`validation_samples`; returns file name -> artifact id (also set as the trial's user
    attribute ``artifacts``)."""
    from optuna.artifacts import upload_artifact
    from safetensors.torch import save_file

    ids: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cbam-nas-") as tmp:
        folder = Path(tmp)
        save_file(
            result.state_dict,
            str(folder / "weights.safetensors"),
            metadata={"architecture": architecture.to_json()},
        )
        (folder / "architecture.json").write_text(architecture.to_json())
        metrics = {**result.metrics(), "overhead": overhead.to_dict()}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if samples is not None:
            save_file(
                samples, str(folder / SAMPLES_FILE), metadata={"normalisation": NORMALISATION}
            )
        for name in ARTIFACT_FILES:
            if not (folder / name).exists():
                continue
            ids[name] = upload_artifact(
                artifact_store=store, file_path=str(folder / name), study_or_trial=trial
            )
    trial.set_user_attr(ARTIFACTS_ATTR, ids)
    return ids


# -- progress --------------------------------------------------------------------------------


@functools.cache
def stderr_console() -> Console:
    """The one rich console on stderr, shared by the progress bar and the log handler so that
    log lines print above the bar."""
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """A rich progress bar of the current trial's epochs (a no-op when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        self._task: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=stderr_console(),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, description: str, total: int) -> None:
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(description, total=total)

    def advance(self, description: str | None = None) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, description=description)


# -- the worker ------------------------------------------------------------------------------


class _Heartbeat:
    """Refreshes the row's ``heartbeat_at`` and the worker's ``last_seen`` from a thread."""

    def __init__(self, worker: Worker, claim: Claim) -> None:
        self.worker, self.claim = worker, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.worker.options.heartbeat_interval_s):
            try:
                _update_row(self.worker.db, self.claim.row_id, heartbeat_at=utcnow())
                self.worker.seen(self.claim)
            except Exception:  # a busy database must not end the trial; the next beat retries
                log.exception("heartbeat failed")


class Worker:
    """One worker process's loop; :meth:`run` returns the exit status."""

    def __init__(self, options: WorkerOptions, settings: Settings | None = None) -> None:
        self.options = options
        self.settings = settings or get_settings()
        self.device = str(check_device(options.device))
        self.name = options.name or f"{socket.gethostname()}-{os.getpid()}"
        self.db = open_database(options.database_url or self.settings.database_url)
        self.stopping = threading.Event()
        self._store: Any = None
        self.trials_run = 0

    # -- bookkeeping --

    def seen(self, claim: Claim | None = None) -> None:
        with self.db.session() as session:
            session.merge(
                WorkerSeen(
                    id=self.name,
                    host=socket.gethostname(),
                    device=self.device,
                    last_seen=utcnow(),
                    current_search_id=claim.search_id if claim else None,
                    current_trial=claim.number if claim else None,
                )
            )

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping at the next epoch boundary", signal.Signals(signum).name)
        self.stopping.set()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _search_finished(self) -> bool:
        with self.db.session() as session:
            search = session.get(Search, self.options.search_id)
            return search is None or search.state in FINISHED_SEARCH_STATES

    # -- the loop --

    def run(self) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.db.migrate()
        if self.options.search_id is not None:
            with self.db.session() as session:
                if session.get(Search, self.options.search_id) is None:
                    raise InvalidValue("search", self.options.search_id, "the id of a search")
        log.info("worker %s on %s started", self.name, self.device)
        with self._signals(), _Progress(self.options.progress) as progress:
            while not self.stopping.is_set():
                if (
                    self.options.max_trials is not None
                    and self.trials_run >= self.options.max_trials
                ):
                    break
                try:
                    self.seen()
                    sweep_lost(self.db, self.options.grace_period_s)
                    claim = claim_trial(self.db, self.name, self.device, self.options.search_id)
                except (OperationalError, optuna.exceptions.StorageInternalError) as exc:
                    log.warning("database unavailable, retrying: %s", exc)
                    self.stopping.wait(self.options.poll_interval_s)
                    continue
                if claim is None:
                    if self.options.search_id is not None and self._search_finished():
                        break
                    if self.options.exit_when_idle:
                        break
                    self.stopping.wait(self.options.poll_interval_s)
                    continue
                self.run_trial(claim, progress)
                self.trials_run += 1
                maybe_complete(self.db, claim.search_id)
        self.seen()
        log.info("worker %s stopped after %d trials", self.name, self.trials_run)
        self.db.close()
        return 0

    def run_trial(self, claim: Claim, progress: _Progress | None = None) -> ResultState | None:
        """Run one claimed attempt to its end; returns the row's final state (None if the row
        was taken from this worker)."""
        progress = progress or _Progress(False)
        self.seen(claim)
        with _Heartbeat(self, claim):
            trial: optuna.Trial | None = None
            try:
                trial = self._trial(claim)
                return self._evaluate(claim, trial, progress)
            except SearchFailed as exc:
                log.error("%s: search failed: %s", claim.label, exc)
                _fail_search(self.db, claim.search_id, str(exc))
                return self._end(claim, trial, ResultState.failed, str(exc))
            except TrialFailed as exc:
                log.warning("%s failed: %s", claim.label, exc.reason)
                return self._end(claim, trial, ResultState.failed, exc.reason)
            except Exception as exc:
                log.exception("%s failed", claim.label)
                return self._end(claim, trial, ResultState.failed, f"{type(exc).__name__}: {exc}")

    def _trial(self, claim: Claim) -> optuna.Trial:
        budget = claim.spec.budget.trials
        study = load_study(
            self.db,
            claim.study_name,
            claim.spec,
            seed_offset=claim.number + budget * claim.attempt,
        )
        if claim.retry_of is not None:
            return retry_trial(study, frozen_trial(study, claim.retry_of))
        return study.ask()

    def _data(self, spec: SearchSpec) -> DatasetTensors | StreamingData:
        try:
            return load_dataset(
                spec.dataset.name,
                spec.dataset.options,
                self.settings.data_dir,
                spec.dataset.val_fraction,
                spec.seed,
            )
        except (InvalidValue, DatasetNotFound) as exc:
            raise SearchFailed(str(exc)) from exc

    def _evaluate(
        self, claim: Claim, trial: optuna.Trial, progress: _Progress
    ) -> ResultState | None:
        spec = claim.spec
        architecture, reference = architecture_for(trial, spec)
        _update_row(
            self.db,
            claim.row_id,
            architecture=architecture.to_dict(),
            arch_id=architecture.id,
            label=architecture.describe(),
            reference=reference,
            optuna_number=trial.number,
        )
        data = self._data(spec)
        overhead = measure(
            architecture,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            input_size=data.image_size,
            device=self.device,
            batch_size=self.options.latency_batch,
            repeats=self.options.latency_repeats,
            warmup=min(3, self.options.latency_repeats),
        )
        figures = {k: getattr(overhead, k) for k in _OVERHEAD_COLUMNS}
        _update_row(self.db, claim.row_id, **figures)
        constraint = constraint_value(spec, figures)
        if constraint is not None:
            set_constraint(trial, constraint)
            if constraint > 0:
                log.info(
                    "%s %s: over the overhead budget by %.2f points, not trained",
                    claim.label,
                    architecture.describe(),
                    constraint,
                )
                return self._end(claim, trial, ResultState.over_budget, None, TrialState.PRUNED)

        progress.start(f"{claim.label} {architecture.describe()}", spec.training.epochs)
        on_epoch = self._on_epoch(claim, trial, reference, progress)
        result = train(
            architecture,
            data,
            spec.training,
            seed=spec.seed,
            device=self.device,
            on_epoch=on_epoch,
            threads=self.options.threads,
        )
        return self._finish(claim, trial, architecture, overhead, result, data)

    def _on_epoch(
        self, claim: Claim, trial: optuna.Trial, reference: str | None, progress: _Progress
    ) -> Callable[[EpochReport], None]:
        spec = claim.spec
        policy = early_stopping_policy(spec)
        curve: list[dict[str, Any]] = []

        def on_epoch(report: EpochReport) -> None:
            curve.append(report.to_dict())
            best = max(point["val_accuracy"] for point in curve)
            alive = _update_row(
                self.db,
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
                spec.training.epochs,
                report.val_accuracy,
                report.train_loss,
                report.seconds,
                report.images_per_s,
            )
            progress.advance()
            if not alive:
                raise StopTraining("lost")
            if report.epoch >= spec.training.epochs:
                return  # the trial is complete: keep its result whatever happens now
            if self.stopping.is_set():
                raise StopTraining("shutdown")
            with self.db.session() as session:
                state = session.scalar(select(Search.state).where(Search.id == claim.search_id))
            if state != SearchState.running:
                raise StopTraining("cancelled")
            context = EpochContext(
                self.db, claim.search_id, claim.row_id, trial, report.epoch, report.val_accuracy
            )
            # References always run to the end (they are the baselines), but are reported to
            # the policy so that Optuna's pruners see them.
            if policy.should_stop(context) and reference is None:
                raise StopTraining("pruned")

        return on_epoch

    def _finish(
        self,
        claim: Claim,
        trial: optuna.Trial,
        architecture: Architecture,
        overhead: OverheadReport,
        result: TrainResult,
        data: DatasetTensors | StreamingData | None = None,
    ) -> ResultState | None:
        common = {
            "val_accuracy": result.best_val_accuracy,
            "final_val_accuracy": result.final_val_accuracy,
            "test_accuracy": result.test_accuracy,
            "epochs_run": result.epochs_run,
            "wall_time_s": result.wall_time_s,
            "images_per_s": result.images_per_s,
        }
        if result.stopped == "lost":
            log.warning("%s was taken from this worker (heartbeat too old)", claim.label)
            tell_failed(self.db, claim.study_name, trial.number)
            return None
        if result.stopped == "shutdown":
            return self._end(claim, trial, ResultState.requeued, f"{STOPPED_REASON} (signal)")
        if result.stopped == "cancelled":
            return self._end(claim, trial, ResultState.failed, CANCELLED_REASON)
        if result.stopped == "pruned":
            _update_row(self.db, claim.row_id, **common)
            return self._end(claim, trial, ResultState.pruned, None, TrialState.PRUNED)
        if self._store is None:
            self._store = artifact_store(self.settings, self.options.artifacts_dir)
        samples = None
        if data is not None:
            try:
                samples = validation_samples(data)
            except Exception:  # the pictures are optional: never lose a trained trial to them
                log.warning("%s: no sample images stored", claim.label, exc_info=True)
        artifacts = store_artifacts(self._store, trial, architecture, result, overhead, samples)
        values = objective_values(claim.spec, result.best_val_accuracy, overhead.to_dict())
        _update_row(self.db, claim.row_id, artifacts=artifacts, **common)
        return self._end(claim, trial, ResultState.completed, None, values=values)

    def _end(
        self,
        claim: Claim,
        trial: optuna.Trial | None,
        state: ResultState,
        reason: str | None,
        optuna_state: TrialState = TrialState.FAIL,
        values: list[float] | None = None,
    ) -> ResultState | None:
        """Tell the study and close the row (if it is still ours); log the trial's line."""
        if trial is not None:
            study = trial.study
            if values is not None:
                study.tell(trial, values, skip_if_finished=True)
            else:
                study.tell(trial, state=optuna_state, skip_if_finished=True)
        closed = _update_row(
            self.db,
            claim.row_id,
            state=state,
            failure_reason=reason,
            finished_at=utcnow(),
        )
        with self.db.session() as session:
            row = session.get(TrialResult, claim.row_id)
        if not closed or row is None:
            log.warning("%s was taken from this worker before it ended", claim.label)
            return None
        params_pct = "-" if row.params_pct is None else f"{row.params_pct:+.2f}%"
        accuracy = "-" if row.val_accuracy is None else f"{row.val_accuracy:.4f}"
        log.info(
            "%s %s: %s, val acc %s, params %s, %d epochs%s",
            claim.label,
            state.value,
            row.label or "?",
            accuracy,
            params_pct,
            row.epochs_run,
            f" ({reason})" if reason else "",
        )
        return state


def run_worker(options: WorkerOptions) -> int:
    """Run a worker until its work is done (or it is stopped); returns the exit status."""
    return Worker(options).run()
