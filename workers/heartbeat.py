"""A running trial's heartbeat: its row's ``heartbeat_at`` and its worker's ``last_seen``,
refreshed from a thread while the trial trains (see :mod:`workers.queue` for what a missing
heartbeat leads to)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from search.store.engine import RETRY_FIRST_DELAY_S, Database, is_transient
from search.store.models import utcnow
from workers.queue import update_row

log = logging.getLogger("cbam_nas.worker")


class Heartbeat:
    """Every ``interval_s`` while the block runs: refresh row ``row_id``'s heartbeat and call
    ``seen`` (the worker's own liveness row). An unavailable database never ends the trial: the
    next beat comes after :data:`~search.store.engine.RETRY_FIRST_DELAY_S`, so that the first
    heartbeat after an outage comes at once."""

    def __init__(
        self, db: Database, row_id: int, interval_s: float, seen: Callable[[], None]
    ) -> None:
        self.db, self.row_id, self.interval_s, self.seen = db, row_id, interval_s, seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            wait = self.interval_s
            try:
                update_row(self.db, self.row_id, retry=False, heartbeat_at=utcnow())
                self.seen()
            except Exception as exc:  # an unavailable database must not end the trial
                if not is_transient(exc):
                    log.exception("heartbeat failed")
                    continue
                self.db.outage.failed("heartbeat", exc)
                wait = min(self.interval_s, RETRY_FIRST_DELAY_S)
                continue
            self.db.outage.ok()
