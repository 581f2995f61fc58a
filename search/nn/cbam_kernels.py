"""Loader for the hand-written CPU kernels of CBAM (``search/nn/_cbam_cpu.cpp``).

The kernels are compiled on first use with the system compiler (``-O3 -march=native``, OpenMP;
~35-55 s on 2 cores) and kept under the settings' ``kernel_cache_dir`` (``~/.cache/cbam-nas``),
keyed by the source, the compiler flags, the CPU's instruction-set flags and the torch version
(a build for one CPU is never loaded on another). ninja comes from the ``ninja`` package when
it is not on PATH. If the compiler, the headers or the build are missing, :func:`kernels`
returns ``None`` after one logged warning and :mod:`search.nn.cbam_fused` stays on its torch-op
path. ``CBAM_NAS_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from search.settings import Settings

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_cbam_cpu.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


@functools.cache
def settings() -> Settings:
    """The settings the kernels follow, read once per process: asked on every CBAM call, where
    building a ``Settings`` (~0.4 ms) would cost more than the kernel itself. ``reset`` (or
    ``settings.cache_clear()``) reads them again."""
    return Settings()


def enabled() -> bool:
    """Whether the kernels may be used at all (``CBAM_NAS_CPU_KERNELS=0`` says no)."""
    return settings().cpu_kernels


def cache_dir() -> Path:
    """Where builds go: the settings' ``kernel_cache_dir``."""
    return settings().kernel_cache_dir


def _cpu_fingerprint() -> str:
    """The instruction-set flags of this CPU (a ``-march=native`` build is only valid here)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_name() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode()):
        digest.update(part)
    digest.update(_cpu_fingerprint().encode())
    digest.update(torch.__version__.encode())
    return f"cbam_nas_cpu_{digest.hexdigest()[:16]}"


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's extension builder runs ``ninja`` from PATH; a venv that is not activated has
    the ``ninja`` package's binary beside its interpreter only."""
    if shutil.which("ninja"):
        yield
        return
    try:
        import ninja

        extra = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = extra + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build() -> ModuleType:
    # Importing cpp_extension warns about CUDA_HOME on CPU-only machines; these kernels are C++.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        ext_log.setLevel(level)

    name = _build_name()
    directory = cache_dir() / name
    fresh = not (directory / f"{name}.so").is_file()
    if fresh:
        log.info(
            "compiling the CBAM CPU kernels into %s (once per machine, about a minute)", directory
        )
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _ninja_on_path():
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(directory),
            verbose=False,
        )
    if fresh:
        log.info("CBAM CPU kernels compiled in %.0f s", time.perf_counter() - start)
    return module


def kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; ``None`` if unavailable."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            module = None
            if enabled():
                try:
                    module = _build()
                except Exception as err:  # compiler, headers, ninja or the build itself
                    log.warning(
                        "CBAM CPU kernels unavailable, using the torch-op path: %s",
                        str(err).strip().splitlines()[-1] if str(err).strip() else repr(err),
                    )
            _state["module"] = module
    return _state["module"]


def reset() -> None:
    """Forget the loaded kernels (tests: re-evaluate :func:`enabled` and the build)."""
    with _lock:
        _state.clear()
    settings.cache_clear()


def main() -> None:
    """``python -m search.nn.cbam_kernels``: build (or find) the kernels now, and say which path runs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = kernels()
    if module is None:
        print("CBAM CPU kernels: not available here; the torch-op path runs")
    else:
        print(f"CBAM CPU kernels: ready ({Path(module.__file__).parent})")


if __name__ == "__main__":
    main()
