"""``cbam-nas serve``: the API in this process, local workers as supervised child processes.

The schema is migrated on start; the admin token of the embedded default is created (or reused)
and printed; specs given with ``--submit`` are submitted once (an idempotency key from the
file's content, so a restart resumes the same search instead of starting another). Stopping the
server (Ctrl-C, SIGTERM) stops the workers: each hands its running trial back, to be run again
on the next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from search.settings import Settings
from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import Search
from search.store.searches import create_search

log = logging.getLogger("cbam_nas.serve")

PARENT_PID_ENV = "CBAM_NAS_PARENT_PID"
_STOP_TIMEOUT_S = 60.0
_RESPAWN_DELAY_S = 5.0


def worker_devices(device: str, workers: int | None) -> list[str]:
    """The device of each local worker: ``auto`` is one worker per CUDA GPU (else one on the
    CPU); ``cuda`` spreads ``workers`` over the GPUs; anything else is used as given."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if gpus else "cpu"
        if workers is None:
            workers = max(1, gpus)
    count = 1 if workers is None else workers
    if device == "cuda" and gpus:
        return [f"cuda:{i % gpus}" for i in range(count)]
    return [device] * count


def submit_specs(db: Database, settings: Settings, paths: list[Path]) -> list[Search]:
    """Create each spec's search once: the key is the file's content hash, so submitting the
    same file again (a restart) returns the search it created before."""
    searches = []
    for path in paths:
        text = path.read_text()
        spec = SearchSpec.from_yaml(path).validate(
            settings.max_trials_per_search, settings.allowed_data_roots, settings.allow_downloads
        )
        key = "spec-sha256:" + hashlib.sha256(text.encode()).hexdigest()
        searches.append(
            create_search(db, spec, idempotency_key=key, max_trials=settings.max_trials_per_search)
        )
    return searches


class ChildWorkers:
    """Worker child processes: started together, stopped together (SIGTERM: each hands its
    running trial back), and, with ``respawn``, restarted when one dies (``serve``'s local
    workers); without, :meth:`wait` returns once all have exited (a worker's slots)."""

    def __init__(
        self, commands: list[list[str]], env: dict[str, str], respawn: bool = True
    ) -> None:
        self.commands = commands
        self.env = {**env, PARENT_PID_ENV: str(os.getpid())}
        self.respawn = respawn
        self.children: list[subprocess.Popen[bytes] | None] = [None] * len(commands)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="local-workers", daemon=True)

    def _spawn(self, index: int) -> None:
        self.children[index] = subprocess.Popen(self.commands[index], env=self.env)

    def start(self) -> None:
        with self._lock:
            for index in range(len(self.commands)):
                self._spawn(index)
        if self.respawn:
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            with self._lock:
                for index, child in enumerate(self.children):
                    if child is None or child.poll() is None or self._stopping.is_set():
                        continue
                    log.warning(
                        "local worker %d exited with %s; restarting it in %g s",
                        index,
                        child.returncode,
                        _RESPAWN_DELAY_S,
                    )
                    self.children[index] = None
                    threading.Timer(_RESPAWN_DELAY_S, self._respawn, args=(index,)).start()

    def _respawn(self, index: int) -> None:
        with self._lock:
            if not self._stopping.is_set() and self.children[index] is None:
                self._spawn(index)

    def wait(self) -> int:
        """Wait for every child to exit; the largest exit status (0 when all succeeded)."""
        codes = [child.wait() for child in self.children if child is not None]
        return max((abs(code) for code in codes), default=0)

    def stop(self) -> None:
        """SIGTERM every worker (each hands its trial back), wait, then kill stragglers."""
        self._stopping.set()
        with self._lock:
            children = [child for child in self.children if child is not None]
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def local_workers(db: Database, settings: Settings, devices: list[str]) -> ChildWorkers:
    """``serve``'s workers, one per device, restarted when they die; each runs its device's
    default number of slots (``workers.slots``)."""
    env = {
        **os.environ,
        "CBAM_NAS_DATABASE_URL": db.url,
        "CBAM_NAS_ARTIFACTS_DIR": str(Path(settings.artifacts_dir).absolute()),
    }
    cpu_workers = sum(device == "cpu" for device in devices)
    if cpu_workers and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    commands = [
        [
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            "--no-progress",
            "--device",
            device,
            "--name",
            f"local-{os.getpid()}-{index}",
        ]
        for index, device in enumerate(devices)
    ]
    return ChildWorkers(commands, env, respawn=True)


def watch_parent() -> None:
    """In a local worker: exit when the ``serve`` process that started it is gone, even if it
    was killed with SIGKILL (Linux: the kernel sends SIGTERM; elsewhere a polling thread)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not parent.isdigit():
        return
    parent_pid = int(parent)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()
