"""A worker's console output: one rich console on stderr, and the progress bar of a trial."""

from __future__ import annotations

import functools
from typing import Any

from rich.console import Console


@functools.cache
def stderr_console() -> Console:
    """The one rich console on stderr, shared by the progress bar and the log handler so that
    log lines print above the bar."""
    return Console(stderr=True)


class Progress:
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

    def __enter__(self) -> Progress:
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
