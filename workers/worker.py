"""The worker: claim a trial, ask the study, measure, train, tell, store the artifacts; repeat.

The work queue (claims, retries, the sweep of lost trials, row updates) is :mod:`workers.queue`;
this module is the loop around it, a trial's evaluation, the heartbeat and signals.

Liveness. Each trial row's ``heartbeat_at`` is refreshed every ``heartbeat_interval_s`` by a
background thread and at every epoch; the worker's own row (``workers``) is written with each
claim and by that thread. A worker that finds its own row swept (:func:`workers.queue.sweep_lost`)
stops that trial. SIGTERM/SIGINT stop training at the next epoch boundary, hand the trial back at
once (requeued, "worker stopped") and end the worker with status 0. A cancelled search is noticed
at the next epoch boundary.

Database outages (a restart, a failover). During a trial every read and write of the database
is retried through transient errors with backoff (:meth:`search.store.engine.Database.retrying`)
for up to the settings' ``db_retry_s``: training goes on meanwhile, the worker waits at the next
epoch boundary and resumes; if the database stays away longer, the worker exits with status 1 and
its trial is re-run once its heartbeat is older than the grace period. Between trials the worker
keeps looking for work every ``poll_interval_s`` however long the outage. During an outage the
heartbeat thread tries every 0.5 s, so that the first heartbeat after it comes at once. A worker
sweeps for lost trials only once the database has answered for a whole grace period: not while
its own calls fail nor within a grace period after they work again, and on PostgreSQL not within
a grace period of the server's start (by the server's clock, ``pg_postmaster_start_time()``). The
rule assumes a grace period longer than a heartbeat interval plus a second; a worker cut off from
a database that others still reach is swept as a dead one is.

Dry runs (:mod:`workers.dry_run`) go through exactly this path with made-up figures.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import select

from search.errors import InvalidValue
from search.overhead import OverheadReport, check_device, measure
from search.results.queries import rung_accuracies
from search.settings import Settings, get_settings
from search.space import Architecture
from search.spec import SearchSpec
from search.store.artifacts import artifact_store
from search.store.engine import is_transient, open_database
from search.store.models import OVERHEAD_FIELDS, ResultState, Search, SearchState, utcnow
from search.store.searches import FINISHED_STATES, fail_search, maybe_complete
from search.study.early_stopping import EpochContext, early_stopping_policy
from search.study.objectives import (
    CONSTRAINT_ATTR,
    constraint_value,
    objective_values,
    set_constraint,
)
from search.study.optuna_fast import ask, frozen_trial, retry_trial, tell_trial
from search.study.samplers import make_sampler
from search.study.studies import architecture_for, load_study
from workers.artifacts import store_artifacts, validation_samples
from workers.console import Progress
from workers.data import DatasetNotFound, DatasetTensors, StreamingData, load_dataset
from workers.dry_run import dry_run_figures
from workers.heartbeat import Heartbeat
from workers.queue import (
    Claim,
    claim_trial,
    close_row,
    seen_statement,
    seen_values,
    sqlite_ask_lock,
    sweep_interval_s,
    sweep_lost,
    tell_failed,
    update_row,
)
from workers.train import EpochReport, StopTraining, TrainResult, TrialFailed, train

log = logging.getLogger("cbam_nas.worker")

STOPPED_REASON = "worker stopped"
CANCELLED_REASON = "search cancelled"


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
    dry_run: bool = False
    """Coordination only: claim, ask and tell with made-up metrics (:func:`dry_run_figures`)
    without loading data, measuring or training; no artifacts. For load tests and
    ``benchmarks/coordination.py``, never for a real search."""
    dry_run_seconds: float = 0.0
    """With ``dry_run``: how long each trial holds the worker in place of training (a sleep, no
    CPU; heartbeats and signals as in training), so that workers stand in for GPU workers."""


class SearchFailed(Exception):
    """The search cannot run at all (e.g. its dataset is missing): fail the search, not a trial."""


class Worker:
    """One worker process's loop; :meth:`run` returns the exit status."""

    def __init__(self, options: WorkerOptions, settings: Settings | None = None) -> None:
        self.options = options
        self.settings = settings or get_settings()
        self.device = str(check_device(options.device))
        self.name = options.name or f"{socket.gethostname()}-{os.getpid()}"
        self.db = open_database(options.database_url or self.settings.database_url, role="worker")
        self.db.retry_s = self.settings.db_retry_s
        self.stopping = threading.Event()
        self._store: Any = None
        self.trials_run = 0
        # study name -> the Study this worker asks and tells: Optuna's cached storage inside it
        # keeps the finished trials, so that an ask reads only the new and unfinished ones.
        self._studies: dict[str, optuna.Study] = {}
        # Studies whose queue of enqueued trials (the references) this worker found empty: they
        # are enqueued when the study is created, before its search can be claimed, so an ask
        # need not look there again (see _ask).
        self._drained: set[str] = set()
        # The worker's liveness row (its id, host and device), written with each claim.
        self._identity = {"id": self.name, "host": socket.gethostname(), "device": self.device}
        self._swept_at: float | None = None

    # -- bookkeeping --

    def seen(self, claim: Claim | None = None, retry: bool = True) -> None:
        """Record that this worker is alive (and what it runs); with ``retry`` through database
        outages."""

        def write() -> None:
            with self.db.session() as session:
                session.execute(seen_statement(self.db, **seen_values(self._identity, claim)))

        self.db.retrying(write, what="recording the worker") if retry else write()

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
        def read() -> bool:
            with self.db.session() as session:
                search = session.get(Search, self.options.search_id)
                return search is None or search.state in FINISHED_STATES

        return self.db.retrying(read, what="reading the search")

    def _sweep(self) -> None:
        """:func:`sweep_lost`, at most once per :func:`sweep_interval_s` (lost trials wait a
        grace period anyway), so that back-to-back trials do not each pay for it."""
        now = time.monotonic()
        interval = sweep_interval_s(self.options.grace_period_s)
        if self._swept_at is not None and now - self._swept_at < interval:
            return
        sweep_lost(self.db, self.options.grace_period_s)
        self._swept_at = now

    # -- the loop --

    def run(self) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.db.migrate()
        # Optuna's storage checks its schema when created: here, not in the first claimed trial.
        self.db.optuna_storage()
        if self.options.search_id is not None:
            with self.db.session() as session:
                if session.get(Search, self.options.search_id) is None:
                    raise InvalidValue("search", self.options.search_id, "the id of a search")
        log.info(
            "worker %s on %s started%s",
            self.name,
            self.device,
            " (dry run: made-up metrics, nothing trained)" if self.options.dry_run else "",
        )
        last_search: str | None = None  # the search of the last trial, if no claim came since
        with self._signals(), Progress(self.options.progress) as progress:
            while not self.stopping.is_set():
                if (
                    self.options.max_trials is not None
                    and self.trials_run >= self.options.max_trials
                ):
                    break
                try:
                    self._sweep()
                    claim = claim_trial(
                        self.db,
                        self.name,
                        self.device,
                        self.options.search_id,
                        seen=self._identity,
                    )
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    # Claims are not retried blindly (a claim is not idempotent): look again.
                    self.db.outage.failed("looking for work", exc)
                    self.stopping.wait(self.options.poll_interval_s)
                    continue
                self.db.outage.ok()
                last_search = None
                if claim is None:
                    if self.options.search_id is not None and self._search_finished():
                        break
                    if self.options.exit_when_idle:
                        break
                    self.stopping.wait(self.options.poll_interval_s)
                    continue
                try:
                    self.run_trial(claim, progress)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.error(
                        "%s: the database stayed unavailable for %g s; the worker exits (the "
                        "trial is re-run once its heartbeat is older than the grace period)",
                        claim.label,
                        self.settings.db_retry_s,
                    )
                    self.db.close()
                    return 1
                self.trials_run += 1
                # The next claim completes the search if this was its last trial (claim_trial);
                # a worker that ends here does it now.
                last_search = claim.search_id
        if last_search is not None:
            maybe_complete(self.db, last_search)
        self.seen()
        log.info("worker %s stopped after %d trials", self.name, self.trials_run)
        self.db.close()
        return 0

    def run_trial(self, claim: Claim, progress: Progress | None = None) -> ResultState | None:
        """Run one claimed attempt to its end; returns the row's final state (None if the row
        was taken from this worker)."""
        progress = progress or Progress(False)
        beat = functools.partial(self.seen, claim, retry=False)
        with Heartbeat(self.db, claim.row_id, self.options.heartbeat_interval_s, beat):
            trial: optuna.Trial | None = None
            try:
                trial = self._trial(claim)
                return self._evaluate(claim, trial, progress)
            except SearchFailed as exc:
                log.error("%s: search failed: %s", claim.label, exc)
                fail_search(self.db, claim.search_id, str(exc))
                return self._end(claim, trial, ResultState.failed, str(exc))
            except TrialFailed as exc:
                log.warning("%s failed: %s", claim.label, exc.reason)
                return self._end(claim, trial, ResultState.failed, exc.reason)
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database stayed away past db_retry_s: the worker exits (run)
                log.exception("%s failed", claim.label)
                return self._end(claim, trial, ResultState.failed, f"{type(exc).__name__}: {exc}")

    def _study(self, claim: Claim) -> optuna.Study:
        """The claim's study, loaded once per search, with a sampler seeded for this attempt
        (samplers keep no state between trials that the study's storage does not hold)."""
        seed_offset = claim.number + claim.spec.budget.trials * claim.attempt
        study = self._studies.get(claim.study_name)
        if study is None:
            study = load_study(
                self.db.optuna_storage(), claim.study_name, claim.spec, seed_offset=seed_offset
            )
            self._studies[claim.study_name] = study
        else:
            study.sampler = make_sampler(claim.spec, seed_offset)
        return study

    def _trial(self, claim: Claim) -> optuna.Trial:
        study = self.db.retrying(lambda: self._study(claim), what="loading the study")
        if claim.retry_of is not None:
            previous = self.db.retrying(
                lambda: frozen_trial(study, claim.retry_of), what="reading a trial"
            )
            return self.db.retrying(
                lambda: retry_trial(study, previous, drop_attrs=(CONSTRAINT_ATTR,)),
                what="asking the study",
            )
        queue = claim.study_name not in self._drained
        return ask(
            study,
            self.db.retrying,
            queue=queue,
            lock=lambda: sqlite_ask_lock(self.db),
            drained=self._drained,
        )

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
        self, claim: Claim, trial: optuna.Trial, progress: Progress
    ) -> ResultState | None:
        spec = claim.spec
        architecture, reference = self.db.retrying(
            lambda: architecture_for(trial, spec), what="sampling an architecture"
        )
        update_row(
            self.db,
            claim.row_id,
            architecture=architecture.to_dict(),
            arch_id=architecture.id,
            label=architecture.describe(),
            reference=reference,
            optuna_number=trial.number,
        )
        if self.options.dry_run:
            return self._dry_run(claim, trial, architecture)
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
        figures = {k: getattr(overhead, k) for k in OVERHEAD_FIELDS}
        update_row(self.db, claim.row_id, **figures)
        constraint = constraint_value(spec, figures)
        if constraint is not None:
            self.db.retrying(lambda: set_constraint(trial, constraint), what="telling a constraint")
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

    def _dry_run(
        self, claim: Claim, trial: optuna.Trial, architecture: Architecture
    ) -> ResultState | None:
        """End a dry-run trial: made-up figures, written and told as a trained trial's are,
        after ``dry_run_seconds`` in place of training (a signal meanwhile hands the trial back,
        as at an epoch boundary)."""
        seconds = self.options.dry_run_seconds
        if seconds > 0 and self.stopping.wait(seconds):
            return self._end(claim, trial, ResultState.requeued, f"{STOPPED_REASON} (signal)")
        accuracy, figures = dry_run_figures(architecture)
        constraint = constraint_value(claim.spec, figures)
        if constraint is not None:
            self.db.retrying(lambda: set_constraint(trial, constraint), what="telling a constraint")
            if constraint > 0:
                return self._end(
                    claim, trial, ResultState.over_budget, None, TrialState.PRUNED, **figures
                )
        metrics = {"val_accuracy": accuracy, "final_val_accuracy": accuracy}
        values = objective_values(claim.spec, accuracy, figures)
        return self._end(
            claim,
            trial,
            ResultState.completed,
            None,
            values=values,
            epochs_run=0,
            wall_time_s=seconds,
            **figures,
            **metrics,
        )

    def _on_epoch(
        self, claim: Claim, trial: optuna.Trial, reference: str | None, progress: Progress
    ) -> Callable[[EpochReport], None]:
        spec = claim.spec
        policy = early_stopping_policy(spec)
        curve: list[dict[str, Any]] = []

        def search_state() -> SearchState | None:
            with self.db.session() as session:
                return session.scalar(select(Search.state).where(Search.id == claim.search_id))

        def on_epoch(report: EpochReport) -> None:
            curve.append(report.to_dict())
            best = max(point["val_accuracy"] for point in curve)
            alive = update_row(
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
            if self.db.retrying(search_state, what="reading the search") != SearchState.running:
                raise StopTraining("cancelled")
            context = EpochContext(
                trial,
                report.epoch,
                report.val_accuracy,
                lambda: rung_accuracies(self.db, claim.search_id, report.epoch, claim.row_id),
            )
            # References always run to the end (they are the baselines), but are reported to
            # the policy so that Optuna's pruners see them.
            stop = self.db.retrying(lambda: policy.should_stop(context), what="early stopping")
            if stop and reference is None:
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
            return self._end(claim, trial, ResultState.pruned, None, TrialState.PRUNED, **common)
        if self._store is None:
            self._store = artifact_store(self.settings, self.options.artifacts_dir)
        samples = None
        if data is not None:
            try:
                samples = validation_samples(data)
            except Exception:  # the pictures are optional: never lose a trained trial to them
                log.warning("%s: no sample images stored", claim.label, exc_info=True)
        artifacts = store_artifacts(
            self._store, trial, architecture, result, overhead, samples, db=self.db
        )
        values = objective_values(claim.spec, result.best_val_accuracy, overhead.to_dict())
        return self._end(
            claim, trial, ResultState.completed, None, values=values, artifacts=artifacts, **common
        )

    def _end(
        self,
        claim: Claim,
        trial: optuna.Trial | None,
        state: ResultState,
        reason: str | None,
        optuna_state: TrialState = TrialState.FAIL,
        values: list[float] | None = None,
        **row_values: Any,
    ) -> ResultState | None:
        """Tell the study, then close the row (if it is still ours) with its final state and
        ``row_values`` (the trial's figures) in one update; log the trial's line."""
        if trial is not None:
            if values is not None:
                tell = functools.partial(tell_trial, trial.study, trial, values)
            else:
                tell = functools.partial(tell_trial, trial.study, trial, state=optuna_state)
            self.db.retrying(tell, what="telling the study")
        finished_at = utcnow()
        row = self.db.retrying(
            lambda: close_row(
                self.db,
                claim.row_id,
                state=state,
                failure_reason=reason,
                finished_at=finished_at,
                **row_values,
            ),
            what="updating a trial",
        )
        if row is None:
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
