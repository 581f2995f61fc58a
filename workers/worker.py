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
from types import FrameType
from typing import Any

import optuna

from search.errors import InvalidValue
from search.settings import Settings, get_settings
from search.space import Architecture
from search.store.artifacts import artifact_store
from search.store.engine import Database, is_transient, open_database
from search.store.models import Phase, ResultState, Search, utcnow
from search.store.searches import FINISHED_STATES, fail_search, maybe_complete
from search.study.objectives import CONSTRAINT_ATTR
from search.study.optuna_fast import ask, frozen_trial, retry_trial, tell_trial
from search.study.samplers import make_sampler
from search.study.studies import architecture_for, load_study
from workers import dry_run
from workers.console import Progress
from workers.heartbeat import Heartbeat
from workers.options import WorkerOptions
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
from workers.trial import Outcome, SearchFailed, TrialContext

log = logging.getLogger("cbam_nas.worker")


def check_search(db: Database, search_id: str | None) -> None:
    """InvalidValue naming ``search`` unless ``search_id`` is None or a search in ``db``."""
    if search_id is None:
        return
    with db.session() as session:
        if session.get(Search, search_id) is None:
            raise InvalidValue("search", search_id, "the id of a search")


class Worker:
    """One worker process's loop; :meth:`run` returns the exit status."""

    def __init__(self, options: WorkerOptions, settings: Settings | None = None) -> None:
        self.options = options
        self.settings = settings or get_settings()
        self._evaluate_trial: Callable[[TrialContext], Outcome] = dry_run.evaluate
        self.device = options.device  # a dry run stands in for a worker on it: nothing runs there
        if not options.dry_run:
            # Imported by workers that train only: torch and the training loop, which a dry-run
            # worker never loads (about 2 s of CPU at each start; load tests start dozens).
            from search.overhead import check_device
            from workers import training

            self.device = str(check_device(options.device))
            self._evaluate_trial = training.evaluate
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
        check_search(self.db, self.options.search_id)
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
                if claim.phase == Phase.confirm:  # a run of the race: the study is not asked
                    study = self.db.retrying(lambda: self._study(claim), what="loading the study")
                    return self._end(claim, None, self._confirm(claim, study, progress))
                trial = self._trial(claim)
                return self._end(claim, trial, self._evaluate(claim, trial, progress))
            except SearchFailed as exc:
                log.error("%s: search failed: %s", claim.label, exc)
                fail_search(self.db, claim.search_id, str(exc))
                return self._end(claim, trial, Outcome(ResultState.failed, str(exc)))
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database stayed away past db_retry_s: the worker exits (run)
                log.exception("%s failed", claim.label)
                reason = f"{type(exc).__name__}: {exc}"
                return self._end(claim, trial, Outcome(ResultState.failed, reason))

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

    def _evaluate(self, claim: Claim, trial: optuna.Trial, progress: Progress) -> Outcome:
        """The trial's architecture, recorded on its row, then evaluated: trained, or given
        made-up figures in a dry run."""
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
        return self._evaluate_trial(
            self._context(claim, trial, trial.study, architecture, reference, progress)
        )

    def _confirm(self, claim: Claim, study: optuna.Study, progress: Progress) -> Outcome:
        """A confirmation run: the claim's architecture on the claim's seed, for the
        confirmation's schedule; nothing is told to the study."""
        architecture = Architecture.from_dict(claim.architecture or {})
        context = self._context(claim, None, study, architecture, claim.reference, progress)
        return self._evaluate_trial(context)

    def _context(
        self,
        claim: Claim,
        trial: optuna.Trial | None,
        study: optuna.Study,
        architecture: Architecture,
        reference: str | None,
        progress: Progress,
    ) -> TrialContext:
        spec = claim.spec
        confirming = claim.phase == Phase.confirm
        epochs = spec.confirm_epochs if confirming else spec.training.epochs
        return TrialContext(
            claim,
            trial,
            study,
            architecture,
            reference,
            spec.training.model_copy(update={"epochs": epochs}),
            spec.seed if claim.seed is None else claim.seed,
            self.db,
            self.settings,
            self.options,
            self.device,
            self.stopping,
            progress,
            self._artifact_store,
        )

    def _artifact_store(self) -> Any:
        if self._store is None:
            self._store = artifact_store(self.settings, self.options.artifacts_dir)
        return self._store

    def _end(
        self, claim: Claim, trial: optuna.Trial | None, outcome: Outcome
    ) -> ResultState | None:
        """Tell the study, then close the row (if it is still ours) with the outcome's state
        and figures in one update; log the trial's line."""
        if outcome.lost:
            trial_number = None if trial is None else trial.number
            tell_failed(self.db, claim.study_name, trial_number)
            return None
        state, reason = outcome.state, outcome.reason
        if trial is not None:
            if outcome.values is not None:
                tell = functools.partial(tell_trial, trial.study, trial, outcome.values)
            else:
                tell = functools.partial(tell_trial, trial.study, trial, state=outcome.optuna_state)
            self.db.retrying(tell, what="telling the study")
        finished_at = utcnow()
        row = self.db.retrying(
            lambda: close_row(
                self.db,
                claim.row_id,
                state=state,
                failure_reason=reason,
                finished_at=finished_at,
                **outcome.row,
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
