"""Files the API makes on demand from stored artifacts (ONNX exports, attention reports) and
keeps under the cache directory: made once per path even when requests race for it, and
written atomically, so a reader never sees half a file."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def made_once(path: Path, make: Callable[[], bytes]) -> Path:
    """``path``, written with ``make()``'s bytes unless it exists already."""
    with _locks_guard:
        lock = _locks.setdefault(path, threading.Lock())
    with lock:
        if path.exists():
            return path
        data = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
