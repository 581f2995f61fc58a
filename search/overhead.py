"""What attention costs: parameters, multiply-accumulates, elementwise work, latency, memory.

Counts
------
``count_macs`` reports multiply-accumulates of convolutions and matrix products, as the CBAM paper
counts its "FLOPs": ``torch.utils.flop_counter.FlopCounterMode`` over the backbone, divided by two.
Attention modules are counted from their definition instead of their implementation, because our
fused CBAM computes small spatial convolutions as a banded matrix product (faster, but more
arithmetic than the convolution it stands for). Per module seeing a (B, C, H, W) map, with T pool
types, hidden width h and spatial kernel k:

* channel gate: the shared MLP once per pooled descriptor, ``B * T * 2 * C * h``;
* spatial gate: ``B * M * k * k * H * W`` with M = 2 pooled maps (max & mean), or M = 1 plus
  ``B * C * H * W`` for the learned 1x1 pooling conv.

That is what CBAM adds to ResNet-50 (paper: 3.858 -> 3.864 G). It hides CBAM's real cost, the
passes over the full feature map, so ``attention_ops`` reports those separately, in elementwise
operations. With N = C * H * W per sample:

* channel gate: ``T * N`` (pooling reads) + ``(T - 1) * C`` (sum of MLP outputs) + ``C``
  (sigmoid) + ``N`` (gate multiply);
* spatial gate: ``2 * N`` (channel max and mean; 0 for the 1x1 conv, already in the MACs) +
  ``H * W`` (sigmoid) + ``H * W`` more with BN + ``N`` (gate multiply);

all times B. The paper's CBAM thus adds about 6 N per block, SE about 2 N.

Timings
-------
``measure_latency``: median of timed forward passes after a warm-up, eval mode, under
``torch.inference_mode``; on CUDA channels_last, autocast (bfloat16 where supported, else float16)
and ``torch.cuda.synchronize`` around each pass. ``measure_train_step``: median of
forward + backward + SGD steps on random data, and the peak memory of a step: on CUDA
``torch.cuda.max_memory_allocated`` (less what was allocated before the model arrived); on CPU an
estimate, the bytes of the tensors autograd saves for backward plus input, parameters, gradients
and momentum buffers. ``measure`` does both for an architecture and for the same backbone without
attention, alternating the two models pass by pass so that drifting clocks or a busy neighbour
affect both alike.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from search.build import build_model
from search.errors import InvalidValue
from search.knobs import CBAMConfig, has_channel_gate, has_spatial_gate
from search.nn.cbam import CBAM
from search.space import Architecture

InputShape = tuple[int, int, int]
_Call = tuple[CBAMConfig, tuple[int, ...]]


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device if this machine has it; InvalidValue("device", ...) if not."""
    allowed = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidValue("device", device, allowed) from None
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu" or str(dev) in allowed:
        return dev
    raise InvalidValue("device", str(device), allowed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_macs(config: CBAMConfig, shape: Sequence[int]) -> int:
    """Multiply-accumulates of one attention module on a (B, C, H, W) input (module docstring)."""
    b, c, h, w = shape
    macs = 0
    if has_channel_gate(config.arrangement):
        macs += len(config.pool_types) * 2 * c * config.hidden_channels(c)
    if has_spatial_gate(config.arrangement):
        maps = 2 if config.spatial_pool == "maxmean" else 1
        macs += maps * config.kernel_size**2 * h * w
        macs += c * h * w if config.spatial_pool == "conv" else 0
    return b * macs


def attention_elementwise_ops(config: CBAMConfig, shape: Sequence[int]) -> int:
    """Elementwise and pooling operations of one attention module (module docstring)."""
    b, c, h, w = shape
    n = c * h * w
    ops = 0
    if has_channel_gate(config.arrangement):
        t = len(config.pool_types)
        ops += t * n + (t - 1) * c + c + n
    if has_spatial_gate(config.arrangement):
        ops += 2 * n if config.spatial_pool == "maxmean" else 0
        ops += h * w * (2 if config.spatial_bn else 1) + n
    return b * ops


@contextlib.contextmanager
def _attention_bypassed(model: nn.Module) -> Iterator[list[_Call]]:
    """Attention modules pass their input through unchanged and record (config, shape).

    Attention keeps shapes, so the rest of the network sees what it would see anyway.
    ``SqueezeExcite`` is a CBAM (channel gate, average pooling) and is recorded as one.
    """
    calls: list[_Call] = []
    modules = [m for m in model.modules() if isinstance(m, CBAM)]

    def passthrough(module: CBAM) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            calls.append((module.config, tuple(x.shape)))
            return x

        return forward

    for m in modules:
        m.forward = passthrough(m)
    try:
        yield calls
    finally:
        for m in modules:
            del m.forward


def _trace(model: nn.Module, input_shape: InputShape, batch: int = 1) -> tuple[int, int]:
    """(MACs, attention elementwise ops) of one forward pass in eval mode."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            _attention_bypassed(model) as calls,
            FlopCounterMode(display=False) as counter,
        ):
            model(torch.zeros(batch, *input_shape, device=device))
    finally:
        model.train(was_training)
    macs = counter.get_total_flops() // 2 + sum(attention_macs(c, s) for c, s in calls)
    return macs, sum(attention_elementwise_ops(c, s) for c, s in calls)


def count_macs(model: nn.Module, input_shape: InputShape, batch: int = 1) -> int:
    """Multiply-accumulates of convolutions and matrix products for one forward pass."""
    return _trace(model, input_shape, batch)[0]


def attention_ops(model: nn.Module, input_shape: InputShape, batch: int = 1) -> int:
    """The elementwise and pooling operations the attention modules add to one forward pass."""
    return _trace(model, input_shape, batch)[1]


# -- timing ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _prepare(model: nn.Module, device: torch.device, batch: torch.Tensor) -> torch.Tensor:
    """Move ``model`` to ``device`` (channels_last on CUDA); return ``batch`` laid out to match."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        return batch.to(device).contiguous(memory_format=torch.channels_last)
    return batch.to(device)


class _Timed:
    """A callable that runs one unit of work and returns its wall time in ms."""

    device: torch.device

    def run(self) -> None:
        raise NotImplementedError

    def __call__(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.run()
        _sync(self.device)
        return (time.perf_counter() - start) * 1000.0


class _Forward(_Timed):
    def __init__(
        self, model: nn.Module, input_shape: InputShape, device: torch.device, batch_size: int
    ) -> None:
        self.device = device
        self.model = model.eval()
        self.x = _prepare(model, device, torch.randn(batch_size, *input_shape))

    def run(self) -> None:
        with torch.inference_mode(), _autocast(self.device):
            self.model(self.x)


class _TrainStep(_Timed):
    def __init__(
        self,
        model: nn.Module,
        input_shape: InputShape,
        num_classes: int,
        device: torch.device,
        batch_size: int,
    ) -> None:
        self.device = device
        self.allocated_before = 0
        if device.type == "cuda":
            # What the device holds apart from this model (which may be there already).
            resident = sum(
                t.numel() * t.element_size()
                for t in itertools.chain(model.parameters(), model.buffers())
                if t.device == device
            )
            self.allocated_before = torch.cuda.memory_allocated(device) - resident
        self.model = model.train()
        self.x = _prepare(model, device, torch.randn(batch_size, *input_shape))
        self.y = torch.randint(0, num_classes, (batch_size,), device=device)
        # A small learning rate keeps repeated steps on random data finite.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def run(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def peak_memory(self) -> int:
        """Peak bytes of one step (see the module docstring); call before other models arrive."""
        if self.device.type == "cuda":
            self.run()
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.run()
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.allocated_before
        params = list(self.model.parameters())
        seen = {p.untyped_storage().data_ptr() for p in params}
        seen.add(self.x.untyped_storage().data_ptr())
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            try:
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):
                ptr, nbytes = id(t), t.numel() * t.element_size()
            if ptr not in seen:
                seen.add(ptr)
                saved += nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.run()
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        # parameters + gradients + momentum buffers + input + saved activations
        return param_bytes + 2 * trainable + self.x.numel() * self.x.element_size() + saved


def _interleaved_medians(runs: Sequence[_Timed], warmup: int, repeats: int) -> list[float]:
    """Median ms of each run, alternating runs within every repeat."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(max(1, repeats)):
        for run, samples in zip(runs, times, strict=True):
            samples.append(run())
    return [statistics.median(samples) for samples in times]


def measure_latency(
    model: nn.Module,
    input_shape: InputShape,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 20,
) -> float:
    """Median ms of a forward pass (moves ``model`` to ``device`` and sets eval mode)."""
    run = _Forward(model, input_shape, check_device(device), batch_size)
    return _interleaved_medians([run], warmup, repeats)[0]


def measure_train_step(
    model: nn.Module,
    input_shape: InputShape,
    num_classes: int,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    warmup: int = 2,
    repeats: int = 10,
) -> tuple[float, int]:
    """(median ms of forward + backward + SGD step, peak bytes of a step) on a copy of ``model``."""
    run = _TrainStep(
        copy.deepcopy(model), input_shape, num_classes, check_device(device), batch_size
    )
    peak = run.peak_memory()
    return _interleaved_medians([run], warmup, repeats)[0], peak


# -- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverheadReport:
    """An architecture's figures, the same backbone's without attention, and the overhead in %.

    Timings and memory are None when not measured; a percentage is None where undefined.
    """

    architecture: dict[str, Any]
    architecture_id: str
    label: str
    backbone: str
    device: str
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: int
    train_batch_size: int | None
    peak_memory_estimated: bool
    params: int
    macs: int
    attention_ops: int
    latency_ms: float | None
    train_step_ms: float | None
    peak_memory_bytes: int | None
    baseline_params: int
    baseline_macs: int
    baseline_attention_ops: int
    baseline_latency_ms: float | None
    baseline_train_step_ms: float | None
    baseline_peak_memory_bytes: int | None
    params_pct: float | None
    macs_pct: float | None
    latency_pct: float | None
    train_step_pct: float | None
    peak_memory_pct: float | None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out


# figure -> name of its percentage field
_RELATIVE = {
    "params": "params_pct",
    "macs": "macs_pct",
    "latency_ms": "latency_pct",
    "train_step_ms": "train_step_pct",
    "peak_memory_bytes": "peak_memory_pct",
}


def _pct(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return 100.0 * (value - baseline) / baseline


def measure(
    architecture: Architecture,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int | None = None,
    device: str | torch.device = "cpu",
    latency: bool = True,
    train_step: bool = False,
    batch_size: int = 1,
    train_batch_size: int = 32,
    warmup: int = 3,
    repeats: int = 15,
    seed: int = 0,
) -> OverheadReport:
    """Count and time ``architecture`` and its backbone without attention on ``device``.

    ``input_size`` defaults to the backbone's design size (32 or 224). For an architecture
    without attention both sides are the same measurement, so every percentage is 0.
    """
    dev = check_device(device)
    size = input_size or architecture.info.input_size
    shape: InputShape = (in_channels, size, size)
    baseline_arch = Architecture(architecture.backbone, "none")
    same = architecture == baseline_arch
    torch.manual_seed(seed)
    models = [build_model(architecture, num_classes, in_channels)]
    if not same:
        models.append(build_model(baseline_arch, num_classes, in_channels))
    figures: list[dict[str, Any]] = []
    for model in models:
        macs, ops = _trace(model, shape)
        figures.append(
            {
                "params": count_params(model),
                "macs": macs,
                "attention_ops": ops,
                "latency_ms": None,
                "train_step_ms": None,
                "peak_memory_bytes": None,
            }
        )
    if latency:
        runs = [_Forward(m, shape, dev, batch_size) for m in models]
        for fig, ms in zip(figures, _interleaved_medians(runs, warmup, repeats), strict=True):
            fig["latency_ms"] = ms
    if train_step:
        steps = []
        for model, fig in zip(models, figures, strict=True):
            steps.append(_TrainStep(model, shape, num_classes, dev, train_batch_size))
            fig["peak_memory_bytes"] = steps[-1].peak_memory()
        for fig, ms in zip(figures, _interleaved_medians(steps, warmup, repeats), strict=True):
            fig["train_step_ms"] = ms
    candidate, baseline = figures[0], figures[-1]
    return OverheadReport(
        architecture=architecture.to_dict(),
        architecture_id=architecture.id,
        label=architecture.describe(),
        backbone=architecture.backbone,
        device=str(dev),
        input_shape=shape,
        num_classes=num_classes,
        batch_size=batch_size,
        train_batch_size=train_batch_size if train_step else None,
        peak_memory_estimated=train_step and dev.type != "cuda",
        **candidate,
        **{f"baseline_{k}": v for k, v in baseline.items()},
        **{pct: _pct(candidate[k], baseline[k]) for k, pct in _RELATIVE.items()},
    )
