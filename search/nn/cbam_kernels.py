"""The hand-written CPU kernels of CBAM (``_cbam_cpu.cpp``): their build, and what they read
from a module.

On CPU, in float32/float64, the paper's arrangement (channel then spatial) with avg/max channel
pooling and max & mean spatial pooling (:attr:`search.knobs.CBAMConfig.kernels_fit`) runs here:
each sample is pooled, gated and differentiated while it sits in cache, ~3 passes over the
feature map forward and ~5 backward, with no per-op overhead; forward and backward are one
autograd function written in C++. What the kernels read from a module is kept per module
(:class:`KernelPlan`). Every other CPU case takes :mod:`search.nn.cbam_fused`.

The kernels are compiled on first use with the system compiler (``-O3 -march=native``, OpenMP;
~35-55 s on 2 cores) and kept under the settings' ``kernel_cache_dir`` (``~/.cache/cbam-nas``),
keyed by the source, the compiler flags, the CPU's instruction-set flags and the torch version
(a build for one CPU is never loaded on another). ninja comes from the ``ninja`` package when
it is not on PATH. If the compiler, the headers or the build are missing, :func:`kernels`
returns ``None`` after one logged warning and the torch-op path (:mod:`search.nn.cbam_fused`)
runs. ``CBAM_NAS_CPU_KERNELS=0`` turns the kernels off.
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
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from search.nn.gates import GatedModule
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
    building a ``Settings`` (~0.4 ms) would cost more than the kernel itself
    (``settings.cache_clear()`` reads them again)."""
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


# -- plans: what the kernels read from one module ---------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """What the kernels take from one module: its tensors and fixed flags, read once."""

    bn: nn.BatchNorm2d | None  # its training flag, momentum and eps are read on every call
    params: tuple[Tensor | None, ...]  # fc1 w, b; fc2 w, b; conv w; BatchNorm w, b
    stats: tuple[Tensor | None, Tensor | None]  # the BatchNorm's running mean and variance
    batches: Tensor | None  # its num_batches_tracked, where it keeps running statistics
    flags: tuple[int, int, bool, bool]  # avg and max slots, mean first, has BatchNorm
    held: tuple[tuple[dict[str, Any], str, Any], ...]  # (a module's dict, name, what it held)

    def still_held(self) -> bool:
        """Whether the module still holds every submodule and tensor this plan was read from:
        assignment, ``load_state_dict(assign=True)`` and ``torch.func.functional_call`` all
        swap them in the modules' own dicts (the last without any hook). ~10 us with cold
        caches, against ~80 us for reading the module again."""
        return all(place.get(name) is what for place, name, what in self.held)


# Plans per module, for the dtype of its last input. Walking a module's submodules and
# parameters (``nn.Module.__getattr__``) on every call cost ~0.1 ms with cold caches, as much as
# the kernels themselves at CIFAR sizes. Weak keys: a plan goes with its module and is never
# copied or pickled with it.
_plans: weakref.WeakKeyDictionary[GatedModule, tuple[torch.dtype, KernelPlan | None]] = (
    weakref.WeakKeyDictionary()
)


def forget_kernel_plan(m: GatedModule) -> None:
    """Drop the module's plan (``CBAM._apply``: a cast or a move keeps the tensor objects)."""
    _plans.pop(m, None)


def _make_plan(x: Tensor, m: GatedModule) -> KernelPlan | None:
    if x.dtype not in _KERNEL_DTYPES or not m.config.kernels_fit:
        return None
    channel, spatial = m.channel_gate, m.spatial_gate
    fc1, fc2, conv, bn = channel.fc1, channel.fc2, spatial.conv, spatial.bn
    # Where each tensor the kernels read lives: the parameters in the order the kernels'
    # backward returns their gradients, then the BatchNorm's buffers.
    places: list[tuple[dict[str, Any], str]] = [
        *((layer._parameters, name) for layer in (fc1, fc2) for name in ("weight", "bias")),
        (conv._parameters, "weight"),
    ]
    if bn is not None:
        places += [(bn._parameters, "weight"), (bn._parameters, "bias")]
        places += [(bn._buffers, n) for n in ("running_mean", "running_var", "num_batches_tracked")]
    tensors = [place.get(name) for place, name in places]
    params = tuple(tensors[:7]) if bn is not None else (*tensors, None, None)
    if any(p is not None and (p.dtype != x.dtype or not p.is_cpu) for p in params):
        return None
    stats, batches = (None, None), None
    if bn is not None:
        stats = (tensors[7], tensors[8])
        batches = tensors[9] if stats[0] is not None else None
    held = [
        (m._modules, "channel_gate", channel),
        (m._modules, "spatial_gate", spatial),
        (channel._modules, "fc1", fc1),
        (channel._modules, "fc2", fc2),
        (spatial._modules, "conv", conv),
        (spatial._modules, "bn", bn),
        *((place, name, t) for (place, name), t in zip(places, tensors, strict=True)),
    ]
    pools = channel.pool_types
    avg = pools.index("avg") if "avg" in pools else -1
    mx = pools.index("max") if "max" in pools else -1
    flags = (avg, mx, spatial.mean_first, bn is not None)
    return KernelPlan(bn, params, stats, batches, flags, tuple(held))


def kernel_route(x: Tensor, m: GatedModule) -> tuple[ModuleType, KernelPlan] | None:
    """The compiled CPU kernels and the module's plan, if they cover this input and module;
    else ``None``. ``x`` is contiguous or channels_last (``CBAM.forward`` makes it so)."""
    if not x.is_cpu or not enabled():
        return None
    cached = _plans.get(m)
    if cached is None or cached[0] != x.dtype or not (cached[1] is None or cached[1].still_held()):
        cached = _plans[m] = (x.dtype, _make_plan(x, m))
    plan = cached[1]
    if plan is None:
        return None
    bn = plan.bn
    if bn is not None and (bn.momentum is None or (plan.stats[0] is None and not bn.training)):
        return None
    loaded = kernels()
    return None if loaded is None else (loaded, plan)


def kernel_forward(kernels: ModuleType, x: Tensor, plan: KernelPlan, grad: bool) -> Tensor:
    """``out = x * A * S`` through the kernels. With ``grad``, ``out`` carries the kernels'
    backward, an autograd function written in C++."""
    bn = plan.bn
    training = bn is not None and bn.training
    args = (
        x,
        *plan.params,
        *plan.stats,
        *plan.flags,
        training,
        bn.momentum if bn is not None else 0.0,
        bn.eps if bn is not None else 0.0,
        plan.batches if training else None,
    )
    return kernels.forward_autograd(*args) if grad else kernels.forward(*args)[0]


def main() -> None:
    """``python -m search.nn.cbam_kernels``: build (or find) the kernels now, and say which path
    runs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = kernels()
    if module is None:
        print("CBAM CPU kernels: not available here; the torch-op path runs")
    else:
        print(f"CBAM CPU kernels: ready ({Path(module.__file__).parent})")


if __name__ == "__main__":
    main()
