"""Coordination between workers: claimed trials per second and the overhead each trial costs.

For 1, 2, 4 and 8 workers, on SQLite (a temporary file in WAL mode) and on PostgreSQL, fresh
searches (random sampler) are run to completion by dry-run workers (``WorkerOptions.dry_run``):
each trial is claimed, asked (the architecture sampled, its parameters written to the study),
written to its row and told with made-up metrics, without data, measuring or training. What a
trial costs besides its training is then nothing but coordination: our claim (with the worker's
liveness row and, when due, the completion of a search), the trial-result row updates, the sweep
for lost trials, and Optuna's ask and tell on its RDB storage. Two modes:

* back to back (no-op trials, ``--trials`` per run): the workers do nothing but coordinate, so
  this is the saturation figure, the trials per second that the database and the CPUs can
  coordinate. With more workers than free cores every process waits for a core, so the
  worker-time per trial (about workers x wall / trials) grows with the oversubscription even
  where trials/s does not drop: read the CPU columns for what a trial costs.
* simulated trials (``--trial-seconds S``, default 1 s; ``--sim-trials`` per worker): each
  dry-run trial holds its worker for S seconds in place of training
  (``WorkerOptions.dry_run_seconds``: a sleep, no CPU, heartbeats going as in training), as a
  GPU worker is held by its trials; 8 such workers do not oversubscribe 2 cores. The overhead
  per trial = worker-time / trials - S is the time per trial that a worker spends not
  training: what every GPU worker pays between two trials. Target: <= 50 ms of overhead per
  trial at 8 workers on PostgreSQL in this mode. Worker i starts i/workers of S after the
  start line, so that the workers' claims are spread over a trial's time as those of GPU
  workers whose trials differ in length are: equal sleeps started together would keep all
  workers in step, all claiming at once every round (the worst case, not the usual one).

Worker-time is the workers' times from their own start to their exit, summed: workers x wall
when they all start at the start line.

Workers are forked from this process once everything is imported. Each runs the real loop
(``Worker.run``: migration check, claims, trials, completion), but waits at a start line after
its first trial: what a worker pays once (the process's connections, Optuna's schema check, the
study loaded, the search's first reads, all workers starting at once) is left out of the timed
part, and a worker process's start-up (interpreter, torch, Optuna) is timed apart, once, as a
real ``cbam-nas worker --dry-run`` process with one trial. The timed trials follow the start
line (the search's budget is the timed trials plus one warm-up trial per worker), until the
search is completed and the last worker has exited.

Printed per run: wall time from the start line to the last worker's exit, trials per second,
the worker-time or overhead per trial, and the CPU time per trial of the workers (user + system,
summed over the worker processes) and, for a PostgreSQL server this script started itself, of
the server.

PostgreSQL: ``--database URL`` (a role that may create tables; a search per run is added there),
else a throwaway server started with ``scripts/postgres.sh`` when PostgreSQL's binaries are
installed, else those rows are skipped. ``--profile`` adds a breakdown of one worker's time per
back-to-back trial (Optuna's ask, parameter writes and tell; our claims, row updates, sweeps).

    python -m benchmarks.coordination [--trials 120] [--trial-seconds 1.0] [--sim-trials 12]
        [--workers 1,2,4,8] [--database URL] [--no-sqlite] [--no-postgres] [--sampler random]
        [--no-back-to-back] [--profile]

About three minutes on 2 busy CPU cores with the defaults (``--profile`` adds 15 s; the
simulated trials take about ``--sim-trials`` x S per run, 8 runs); ``--trials 24 --sim-trials 3
--workers 1,2`` checks the plumbing in about a minute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import func, select

from benchmarks._timing import machine
from search.spec import SearchSpec
from search.store.engine import open_database
from search.store.models import ResultState, Search, SearchState, TrialResult
from search.store.searches import create_search, search_study

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 50.0
TARGET_WORKERS = 8
PG_PORT = 55470


@dataclass
class Run:
    backend: str
    workers: int
    trials: int
    wall_s: float
    worker_s: float  # the workers' times from their start to their exit, summed
    worker_cpu_s: float
    server_cpu_s: float | None
    trial_s: float = 0.0  # the simulated training time of each trial (0: back to back)

    @property
    def trials_per_s(self) -> float:
        return self.trials / self.wall_s

    @property
    def overhead_ms(self) -> float:
        """Worker-time per trial not spent training: worker-time / trials - trial time."""
        return 1e3 * (self.worker_s / self.trials - self.trial_s)

    @property
    def worker_cpu_ms(self) -> float:
        return 1e3 * self.worker_cpu_s / self.trials

    @property
    def server_cpu_ms(self) -> float | None:
        return None if self.server_cpu_s is None else 1e3 * self.server_cpu_s / self.trials


def make_spec(trials: int, sampler: str, seed: int) -> SearchSpec:
    return SearchSpec.from_dict(
        {
            "name": "coordination benchmark",
            "backbone": "cifar_resnet20",
            "dataset": {"name": "synthetic"},
            "budget": {"trials": trials},
            "confirm": {"enabled": False},
            "sampler": sampler,
            "early_stopping": {"policy": "none"},
            "seed": seed,
        }
    )


# -- a throwaway PostgreSQL server and its CPU time --------------------------------------------


def _free_port(start: int) -> int:
    for port in range(start, start + 100):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 99}")


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[tuple[str, Path] | None]:
    """(URL, data directory) of a server started with scripts/postgres.sh, None without
    PostgreSQL's binaries; stopped and deleted afterwards."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        yield None
        return
    pgtmp = tempfile.mkdtemp(prefix="cbam-nas-pg-")
    env = {**os.environ, "PGTMP": pgtmp, "PGPORT_CI": str(_free_port(PG_PORT))}
    script = [str(ROOT / "scripts" / "postgres.sh")]
    try:
        started = subprocess.run(
            [*script, "start"], env=env, capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            raise RuntimeError(f"scripts/postgres.sh start failed:\n{started.stderr}")
        yield started.stdout.strip().splitlines()[-1], Path(pgtmp) / "data"
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)


def _ticks(pid: int) -> tuple[int, int]:
    """(own, reaped children's) CPU clock ticks of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return utime + stime, cutime + cstime


def server_cpu_s(data_dir: Path | None) -> float | None:
    """CPU seconds used so far by the PostgreSQL server in ``data_dir``: the postmaster, its
    live children and the ones it reaped (connections that closed). None when unknown."""
    if data_dir is None:
        return None
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        own, reaped = _ticks(postmaster)
        total = own + reaped
        for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += _ticks(int(child))[0]
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


# -- one run --------------------------------------------------------------------------------


@dataclass
class Report:
    """What a forked worker sends back: its exit status, the trials it ran after the start line
    and the CPU seconds it used meanwhile."""

    name: str
    status: int
    trials: int
    seconds: float
    cpu_s: float


def _worker_process(
    url: str,
    search_id: str,
    name: str,
    trial_s: float,
    delay_s: float,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """A forked worker: runs one warm-up trial (its study loaded, the search's first reads),
    waits at the start line after it, then ``delay_s`` more (its place in the round), runs on
    until the search is completed and reports what it did from then on."""
    from workers.options import WorkerOptions
    from workers.worker import Worker

    logging.basicConfig(level=logging.WARNING, format=f"{name}: %(message)s")
    options = WorkerOptions(
        database_url=url,
        search_id=search_id,
        name=name,
        dry_run=True,
        dry_run_seconds=trial_s,
        exit_when_idle=True,
        poll_interval_s=0.05,
    )
    worker = Worker(options)
    run_trial = worker.run_trial
    started: list[tuple[float, float]] = []  # (wall, CPU) when the timed part started

    def trial_then_start_line(*args: Any, **kwargs: Any) -> Any:
        try:
            return run_trial(*args, **kwargs)
        finally:
            if not started:  # the warm-up trial
                ready.release()
                go.wait()
                time.sleep(delay_s)
                started.append((time.perf_counter(), time.process_time()))

    worker.run_trial = trial_then_start_line  # type: ignore[method-assign]
    status = worker.run()
    wall, cpu = started[0] if started else (time.perf_counter(), time.process_time())
    seconds, used = time.perf_counter() - wall, time.process_time() - cpu
    results.put(Report(name, status, worker.trials_run - 1, seconds, used))


def run_once(
    url: str,
    backend: str,
    workers: int,
    trials: int,
    trial_s: float,
    args: argparse.Namespace,
    data_dir: Path | None,
) -> Run:
    """``trials`` timed trials of ``workers`` workers, after one warm-up trial each; with
    simulated trials (``trial_s``) worker i starts i / workers of a trial after the others."""
    budget = trials + workers
    db = open_database(url)
    db.migrate()
    search = create_search(db, make_spec(budget, args.sampler, args.seed))
    db.close()  # nothing open crosses the fork
    context = multiprocessing.get_context("fork")
    ready, go, results = context.Semaphore(0), context.Event(), context.Queue()
    processes = [
        context.Process(
            target=_worker_process,
            args=(url, search.id, f"bench-{i}", trial_s, i * trial_s / workers, ready, go, results),
            daemon=True,
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        if not ready.acquire(timeout=300):
            raise RuntimeError("a worker did not start or finish its warm-up trial")
    server_before = server_cpu_s(data_dir)
    start = time.perf_counter()
    go.set()
    reports: list[Report] = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    wall = time.perf_counter() - start
    server_after = server_cpu_s(data_dir)
    if any(r.status != 0 for r in reports):
        raise RuntimeError(f"a worker failed: {reports}")
    check(url, search.id, budget)
    if sum(r.trials for r in reports) != trials:
        raise RuntimeError(f"not {trials} trials after the start line: {reports}")
    server = None
    if server_before is not None and server_after is not None:
        server = server_after - server_before
    seconds, cpu = sum(r.seconds for r in reports), sum(r.cpu_s for r in reports)
    return Run(backend, workers, trials, wall, seconds, cpu, server, trial_s)


def check(url: str, search_id: str, trials: int) -> None:
    """Every slot completed once, none running, the study told them all."""
    with open_database(url) as db:
        with db.session() as session:
            search = session.get(Search, search_id)
            rows = session.execute(
                select(TrialResult.state, func.count())
                .where(TrialResult.search_id == search_id)
                .group_by(TrialResult.state)
            ).all()
            numbers = session.scalars(
                select(TrialResult.number).where(TrialResult.search_id == search_id)
            ).all()
        finished = search_study(db, search).get_trials(deepcopy=False, states=_FINISHED)
    states = dict(rows)
    ok = (
        search.state == SearchState.completed
        and states == {ResultState.completed: trials}
        and sorted(numbers) == list(range(trials))
        and len(finished) == trials
    )
    if not ok:
        raise RuntimeError(f"inconsistent search: {search.state}, {states}, {len(finished)} told")


_FINISHED = (optuna.trial.TrialState.COMPLETE,)


def startup_s(url: str, args: argparse.Namespace) -> float:
    """Wall time of one ``cbam-nas worker --dry-run`` process from exec to exit, one trial."""
    db = open_database(url)
    db.migrate()
    search = create_search(db, make_spec(1, args.sampler, args.seed))
    db.close()
    command = [sys.executable, "-m", "service.cli", "worker", "--dry-run", "--no-progress"]
    command += ["--database", url, "--search", search.id, "--poll-interval", "0.05"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the worker process failed:\n{done.stderr[-2000:]}")
    return seconds


# -- where one worker's time goes -------------------------------------------------------------


def profile(url: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(part, wall ms, CPU ms) per trial of one in-process dry-run worker; each call is counted
    in the outermost part it runs in."""
    import workers.worker as worker_module

    wall: collections.Counter[str] = collections.Counter()
    cpu: collections.Counter[str] = collections.Counter()
    depth = threading.local()

    def timed(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            if getattr(depth, "n", 0):
                return fn(*a, **k)
            depth.n = 1
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                depth.n = 0
                wall[part] += time.perf_counter() - start
                cpu[part] += time.thread_time() - start_cpu

        return wrapper

    # The worker's names for what it calls (search.study.optuna_fast's ask and tell, ...).
    parts = [
        (worker_module, "ask", "Optuna ask (new trial; the queue until empty)"),
        (worker_module, "architecture_for", "Optuna sampling and parameter writes"),
        (worker_module, "tell_trial", "Optuna tell"),
        (worker_module.Worker, "_study", "Optuna study and sampler"),
        (worker_module, "claim_trial", "ours: claim (+ liveness row, completions due)"),
        (worker_module, "update_row", "ours: trial-row update (architecture)"),
        (worker_module, "close_row", "ours: trial-row close (figures, state)"),
        (worker_module.Worker, "seen", "ours: worker liveness row (idle, exit)"),
        (worker_module, "sweep_lost", "ours: sweep for lost trials"),
        (worker_module, "maybe_complete", "ours: completion check"),
    ]
    parts = [part for part in parts if hasattr(part[0], part[1])]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]
    db = open_database(url)
    db.migrate()
    search = create_search(db, make_spec(args.profile_trials, args.sampler, args.seed))
    db.close()
    options = worker_module.WorkerOptions(
        database_url=url, search_id=search.id, dry_run=True, poll_interval_s=0.05
    )
    worker = worker_module.Worker(options)
    try:
        for owner, name, label in parts:
            setattr(owner, name, timed(getattr(owner, name), label))
        start, start_cpu = time.perf_counter(), time.thread_time()
        worker.run()
        total_wall, total_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    n = args.profile_trials
    rows = [(label, 1e3 * wall[label] / n, 1e3 * cpu[label] / n) for _, _, label in parts]
    rows.sort(key=lambda r: -r[1])
    rest_wall = 1e3 * total_wall / n - sum(r[1] for r in rows)
    rest_cpu = 1e3 * total_cpu / n - sum(r[2] for r in rows)
    rows.append(("the rest (loop, heartbeat thread start, logging)", rest_wall, rest_cpu))
    rows.append(("total", 1e3 * total_wall / n, 1e3 * total_cpu / n))
    return rows


# -- report ---------------------------------------------------------------------------------


def _cpu(run: Run) -> str:
    server = "-" if run.server_cpu_ms is None else f"{run.server_cpu_ms:.1f}"
    return f"{run.worker_cpu_ms:>13.1f}{server:>13}"


def report(runs: list[Run], startup: dict[str, float], args: argparse.Namespace) -> bool | None:
    print(
        f"coordination: dry-run workers, {args.sampler} sampler; {machine()}; "
        f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    back_to_back = [run for run in runs if run.trial_s == 0]
    simulated = [run for run in runs if run.trial_s > 0]
    cpu_header = f"{'worker CPU':>13}{'server CPU':>13}"
    if back_to_back:
        print(
            f"back to back: no-op trials, {back_to_back[0].trials} per run (saturation; "
            "worker-time ~ workers x wall / trials; CPU in ms per trial)"
        )
        print(
            f"{'database':<12}{'workers':>8}{'wall s':>9}{'trials/s':>10}"
            f"{'worker-time ms':>16}{cpu_header}"
        )
        for run in back_to_back:
            line = f"{run.backend:<12}{run.workers:>8}{run.wall_s:>9.2f}{run.trials_per_s:>10.1f}"
            print(line + f"{run.overhead_ms:>16.1f}{_cpu(run)}")
    verdict = None
    if simulated:
        print(
            f"simulated trials: each holds its worker {simulated[0].trial_s:g} s (a sleep), "
            f"{args.sim_trials} per worker, starts spread over one (overhead = worker-time / "
            f"trials - {simulated[0].trial_s:g} s; ms per trial)"
        )
        print(
            f"{'database':<12}{'workers':>8}{'wall s':>9}{'trials/s':>10}"
            f"{'overhead ms':>13}{cpu_header}"
        )
        for run in simulated:
            line = f"{run.backend:<12}{run.workers:>8}{run.wall_s:>9.2f}{run.trials_per_s:>10.2f}"
            line += f"{run.overhead_ms:>13.1f}{_cpu(run)}"
            if run.backend == "postgresql" and run.workers == TARGET_WORKERS:
                verdict = run.overhead_ms <= TARGET_MS
                line += f"  {'PASS' if verdict else 'FAIL'}"
            print(line)
    for backend, seconds in startup.items():
        print(f"start-up of a worker process ({backend}), exec to exit, 1 trial: {seconds:.2f} s")
    outcome = "not measured" if verdict is None else "PASS" if verdict else "FAIL"
    print(
        f"target <= {TARGET_MS:.0f} ms of overhead per simulated trial at {TARGET_WORKERS} "
        f"workers on PostgreSQL: {outcome}"
    )
    return verdict


def print_profile(backend: str, rows: list[tuple[str, float, float]], trials: int) -> None:
    print(f"one dry-run worker on {backend}, {trials} trials: per trial")
    print(f"{'part':<52}{'wall ms':>9}{'CPU ms':>9}")
    for label, wall_ms, cpu_ms in rows:
        print(f"{label:<52}{wall_ms:>9.2f}{cpu_ms:>9.2f}")


def main(argv: list[str] | None = None) -> bool | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trials", type=int, default=120, help="trials per back-to-back run (the budget)"
    )
    parser.add_argument(
        "--trial-seconds",
        type=float,
        default=1.0,
        help="simulated training time of each trial in the second mode (0: that mode is skipped)",
    )
    parser.add_argument(
        "--sim-trials", type=int, default=12, help="simulated trials per worker in a run"
    )
    parser.add_argument(
        "--back-to-back",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the no-op back-to-back mode",
    )
    parser.add_argument(
        "--workers", default="1,2,4,8", help="comma-separated worker counts, e.g. 1,2,4,8"
    )
    parser.add_argument(
        "--database", default=None, help="a PostgreSQL URL (default: a throwaway server)"
    )
    parser.add_argument("--sqlite", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--postgres", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sampler", default="random", help="the searches' sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action="store_true", help="add one worker's breakdown")
    parser.add_argument("--profile-trials", type=int, default=60)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    runs: list[Run] = []
    startup: dict[str, float] = {}
    profiles: dict[str, list[tuple[str, float, float]]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cbam-nas-bench-")))
        os.environ["CBAM_NAS_ARTIFACTS_DIR"] = str(tmp / "artifacts")  # dry runs store none
        backends: list[tuple[str, str, Path | None]] = []
        if args.sqlite:
            backends.append(("sqlite", f"sqlite:///{tmp / 'bench.db'}", None))
        if args.postgres and args.database:
            backends.append(("postgresql", args.database, None))
        elif args.postgres:
            server = stack.enter_context(throwaway_postgres())
            if server is None:
                print("PostgreSQL is not installed and no --database given: its rows are skipped")
            else:
                backends.append(("postgresql", *server))
        modes = [(args.trials, 0.0)] if args.back_to_back else []
        if args.trial_seconds > 0:
            modes.append((args.sim_trials, args.trial_seconds))
        for backend, url, data_dir in backends:
            for per_run, trial_s in modes:
                for workers in counts:
                    trials = per_run * workers if trial_s else per_run
                    runs.append(run_once(url, backend, workers, trials, trial_s, args, data_dir))
                    print(
                        f"  {backend} x{workers}, {trial_s:g} s trials: {runs[-1].wall_s:.2f} s, "
                        f"load {os.getloadavg()[0]:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
            if args.startup:
                startup[backend] = startup_s(url, args)
            if args.profile:
                profiles[backend] = profile(url, args)
    verdict = report(runs, startup, args)
    for backend, rows in profiles.items():
        print_profile(backend, rows, args.profile_trials)
    return verdict


if __name__ == "__main__":
    main()
