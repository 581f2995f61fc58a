"""The training loop: one Architecture, one dataset, one seed -> accuracy, weights, learning curve.

Written in the manner of airbench: the uint8 images go to the device once, each epoch draws a
seeded permutation and slices batches from them, and the augmentation (random crop with zero
padding, horizontal flip; :mod:`workers.augment`) and the normalisation run on whole batches on the
device. Every hyperparameter comes from the :class:`~search.spec.TrainingSpec`:

* SGD with Nesterov momentum (or AdamW); weight decay on convolution and linear weights only
  (tensors with more than one dimension), never on BatchNorm parameters or biases;
* the learning rate set every step: linear warmup over ``warmup_epochs``, then cosine to zero,
  steps of 0.1 at 50% and 75% of training, linearly to zero (with the warm-up: triangular), or
  constant; label smoothing in the loss;
* optionally an exponential moving average of the weights and BatchNorm statistics
  (``ema_decay``), which validation, test and the stored weights use, and alternating flips
  (``flip_mode``); ``recipe: fast`` turns these on (:func:`search.spec.fast_recipe`);
* channels_last inputs (the default on CPU as on CUDA: faster on both; the convolutions then run
  and return channels_last, while the weights keep their layout, which measured the same on CPU),
  mixed precision on CUDA only (bf16 where supported, else fp16 with a GradScaler), optional
  ``torch.compile``.

Full batches only: the remainder of an epoch's permutation is left out (another one each epoch).
Validation runs after every epoch and is passed to ``on_epoch``, which may raise
:class:`StopTraining` to end the trial at that epoch boundary (pruned, cancelled, shutdown). A
non-finite loss raises :class:`TrialFailed`. On CPU the same seed gives the same weights and the
same accuracy on a rerun (with the same number of threads).

Large ImageFolder sets arrive as :class:`~workers.data.StreamingData`: the batches then come from
its DataLoaders (decoding in worker processes) and are augmented on the device all the same.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from search.build import build_model, load_pretrained
from search.errors import InvalidValue
from search.nn.weights import near_identity_
from search.space import Architecture
from workers.augment import alternate, augment, normalizer, to_float
from workers.data import StreamingData
from workers.graph_step import StaticStep, static_step_refusal, tensor_learning_rates

if TYPE_CHECKING:
    from search.spec import TrainingSpec
    from workers.data import DatasetTensors

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 256
# The learning rate of the "step" schedule is multiplied by 0.1 at these fractions of training.
STEP_MILESTONES = (0.5, 0.75)

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


class TrialFailed(Exception):
    """The trial cannot give a result (e.g. its loss diverged); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end training after that epoch.

    ``reason`` (e.g. ``"pruned"``, ``"cancelled"``, ``"shutdown"``) becomes ``TrainResult.stopped``.
    """

    def __init__(self, reason: str = "stopped") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class EpochReport:
    """One epoch. ``seconds`` covers training and validation; ``images_per_s`` the training part;
    ``lr`` is the learning rate of the epoch's last step; ``train_*`` are over augmented batches."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    images_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What a trial produced. ``state_dict`` holds the final weights (contiguous CPU tensors, no
    shared storage: ready for safetensors). ``images_per_s`` is training images per second of the
    whole trial (model build, validation and test included). ``stopped`` is the reason given with
    :class:`StopTraining`, else None; a stopped trial skips the test set (``test_accuracy``
    None)."""

    best_val_accuracy: float
    final_val_accuracy: float
    test_accuracy: float | None
    epochs_run: int
    wall_time_s: float
    images_per_s: float
    state_dict: dict[str, Tensor] = field(repr=False)
    curve: list[EpochReport]
    stopped: str | None = None

    def metrics(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-ready values (for metrics.json)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("state_dict", "curve")}
        out["curve"] = [report.to_dict() for report in self.curve]
        return out


@functools.cache
def tune_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    glibc serves large blocks with a fresh mmap and trims the heap top on free, so every training
    step page-faults its activations in again. Raising the mmap threshold to its maximum (32 MiB)
    and the trim threshold to 1 GiB keeps those pages mapped for reuse. Process-wide and applied
    once; returns whether it was applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    return bool(mmap_ok and trim_ok)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the base learning rate at ``step`` (from 0) of ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** sum(progress >= m for m in STEP_MILESTONES)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":  # with a warm-up: the triangular schedule
        return 1.0 - progress
    from search.spec import SCHEDULES

    raise InvalidValue("training.schedule", schedule, SCHEDULES)


def make_optimizer(
    model: nn.Module,
    settings: TrainingSpec,
    pretrained: Collection[str] = (),
    fused: bool = False,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """SGD (Nesterov by default) or AdamW; weight decay on weights with more than one dimension.

    Parameters named in ``pretrained`` (loaded from ``backbone_weights``) train at
    ``lr * training.backbone_lr_scale``: their groups carry ``lr_scale``. ``fused``: the fused
    implementation (one kernel per step; reads a tensor learning rate on the device, as a
    CUDA graph needs); ``capturable``: AdamW's step counts kept on the device, which it asks
    for before it lets a CUDA graph capture its step (CUDA only; SGD has no counts)."""
    loaded = set(pretrained)
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = settings.backbone_lr_scale if name in loaded else 1.0
            decay = settings.weight_decay if p.ndim > 1 else 0.0
            buckets.setdefault((scale, decay), []).append(p)
    groups = [
        {"params": params, "weight_decay": decay, "lr": settings.lr * scale, "lr_scale": scale}
        for (scale, decay), params in buckets.items()
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov and settings.momentum > 0,
            fused=fused or None,
        )
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, fused=fused or None, capturable=capturable)
    raise InvalidValue("training.optimizer", settings.optimizer, ("sgd", "adamw"))


def autocast_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """bf16 (or fp16 where bf16 is unsupported) on CUDA when asked; None (fp32) elsewhere."""
    if not mixed_precision or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


Batches = Iterator[tuple[Tensor, Tensor]]
IndexedBatches = Iterator[tuple[Tensor, Tensor, Tensor | None]]
"""Training batches with the indexes of their images in the training set, where known."""


def _slices(x: Tensor, y: Tensor, batch_size: int) -> Batches:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    batches: Batches,
    norm: tuple[Tensor, Tensor],
    device: torch.device,
    memory_format: torch.memory_format,
    amp: torch.dtype | None,
) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for xb, yb in batches:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(to_float(xb, *norm, memory_format))
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
        count += len(yb)
    model.train(was_training)
    return loss_sum.item() / max(1, count), correct.item() / max(1, count)


def evaluate(
    model: nn.Module,
    x_uint8: Tensor,
    y: Tensor,
    data: DatasetTensors | StreamingData,
    device: str | torch.device = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    *,
    channels_last: bool = True,
    mixed_precision: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 images, normalised with ``data``'s
    mean and std, in eval mode, without augmentation.

    ``model`` is moved to ``device`` in place. The defaults are the ones :func:`train` validates
    with, so weights reloaded into ``build_model(architecture)`` reproduce the accuracy
    :func:`train` recorded when the TrainingSpec's ``channels_last`` and ``mixed_precision`` are
    passed on (on CPU the latter has no effect).
    """
    device = torch.device(device)
    memory_format = _memory_format(channels_last)
    model.to(device)
    norm = normalizer(data.mean, data.std, device)
    amp = autocast_dtype(device, mixed_precision)
    return _evaluate(model, _slices(x_uint8, y, batch_size), norm, device, memory_format, amp)


class _TensorSource:
    """In-memory data: the uint8 tensors on the device, batches sliced by a seeded permutation."""

    def __init__(self, data: DatasetTensors, device: torch.device, batch_size: int) -> None:
        self.train = data.train_x.to(device), data.train_y.to(device)
        self.val = data.val_x.to(device), data.val_y.to(device)
        self.test = None
        if data.test_x is not None and data.test_y is not None:
            self.test = data.test_x.to(device), data.test_y.to(device)
        self.batch_size = min(batch_size, len(data.train_y))
        self.steps_per_epoch = len(data.train_y) // self.batch_size

    def train_batches(self, generator: torch.Generator) -> IndexedBatches:
        x, y = self.train
        order = torch.randperm(len(x), generator=generator, device=x.device)
        for i in range(self.steps_per_epoch):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield x[index], y[index], index

    def eval_batches(self, split: str) -> Batches | None:
        pair = self.val if split == "val" else self.test
        return None if pair is None else _slices(*pair, EVAL_BATCH_SIZE)


class _StreamingSource:
    """Large image folders: uint8 batches from :class:`StreamingData`'s DataLoaders, made once
    per trial so that their worker processes live through all epochs. The loader shuffles (seeded)
    and keeps the last, smaller batch."""

    def __init__(
        self, data: StreamingData, device: torch.device, batch_size: int, seed: int
    ) -> None:
        self.device = device
        self.train = data.train_loader(batch_size, seed)
        self.val = data.val_loader(EVAL_BATCH_SIZE)
        self.test = data.test_loader(EVAL_BATCH_SIZE)
        self.steps_per_epoch = len(self.train)

    def train_batches(self, generator: torch.Generator) -> IndexedBatches:
        for xb, yb in self.train:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True), None

    def eval_batches(self, split: str) -> Batches | None:
        loader = self.val if split == "val" else self.test
        return None if loader is None else iter(loader)


def _weights(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict as contiguous CPU tensors, each with its own storage."""
    return {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }


@dataclass
class _Loop:
    """One trial's model, optimiser and data, and what a step needs; see :func:`train`."""

    model: nn.Module
    forward: nn.Module  # the model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    source: _TensorSource | _StreamingSource
    settings: TrainingSpec
    device: torch.device
    generator: torch.Generator
    norm: tuple[Tensor, Tensor]
    memory_format: torch.memory_format
    amp: torch.dtype | None
    ema: AveragedModel | None = None
    flips: Tensor | None = None  # alternating flips: each training image's first-epoch flip
    static: StaticStep | None = None  # training.cuda_graphs
    step: int = 0

    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, float]]:
        """The epoch's training batches, augmented and normalised, each with the learning rate
        of its step."""
        s, steps = self.settings, self.source.steps_per_epoch
        total_steps, warmup_steps = s.epochs * steps, s.warmup_epochs * steps
        padding = s.crop_padding if s.augment else 0
        flip = s.flip and s.augment
        for xb, yb, index in self.source.train_batches(self.generator):
            lr = s.lr * lr_factor(self.step, total_steps, warmup_steps, s.schedule)
            if flip and self.flips is not None and index is not None:
                xb = alternate(
                    augment(xb, padding, False, self.generator), self.flips[index], epoch
                )
            else:
                xb = augment(xb, padding, flip, self.generator)
            yield to_float(xb, *self.norm, self.memory_format), yb, lr
            self.step += 1

    def train_epoch(self, epoch: int) -> tuple[float, float, int, float]:
        """One pass over the training batches -> (mean loss, accuracy, images, last lr)."""
        if self.static is not None:
            return self._static_epoch(epoch)
        s = self.settings
        losses = torch.zeros(self.source.steps_per_epoch, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen, lr = 0, s.lr
        self.model.train()
        for i, (xb, yb, lr) in enumerate(self._batches(epoch)):
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.forward(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=s.label_smoothing)
            # On CPU reading the loss costs nothing: stop before a step with a nan loss.
            if self.device.type == "cpu" and not math.isfinite(loss.item()):
                raise TrialFailed(f"loss is {loss.item()} at epoch {epoch} step {i + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            losses[i] = loss.detach()
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(yb)
        # Elsewhere (CUDA) check once per epoch rather than synchronise every step.
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise TrialFailed(f"loss is {losses[bad].item()} at epoch {epoch} step {bad + 1}")
        return losses.mean().item(), correct.item() / max(1, seen), seen, lr

    def _static_epoch(self, epoch: int) -> tuple[float, float, int, float]:
        """:meth:`train_epoch` through the :class:`StaticStep` (``training.cuda_graphs``)."""
        assert self.static is not None
        seen, lr = 0, self.settings.lr
        self.model.train()
        for xb, yb, lr in self._batches(epoch):
            self.static(xb, yb, lr)
            seen += len(yb)
        loss_sum, correct, nonfinite = self.static.read()
        if nonfinite:
            raise TrialFailed(f"the loss was not finite in epoch {epoch}")
        return loss_sum / max(1, self.source.steps_per_epoch), correct / max(1, seen), seen, lr

    def evaluate(self, split: str) -> tuple[float, float] | None:
        batches = self.source.eval_batches(split)
        if batches is None:
            return None
        model = self.forward if self.ema is None else self.ema.module
        return _evaluate(model, batches, self.norm, self.device, self.memory_format, self.amp)


def train(
    architecture: Architecture,
    data: DatasetTensors | StreamingData,
    settings: TrainingSpec,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochReport], None] | None = None,
    *,
    threads: int | None = None,
    tune_memory: bool = True,
    backbone_weights: str | Path | None = None,
) -> TrainResult:
    """Train ``architecture`` on ``data`` with ``settings``; see the module docstring.

    ``threads`` sets ``torch.set_num_threads`` (None: leave it, torch follows OMP_NUM_THREADS).
    ``tune_memory`` calls :func:`tune_allocator` first. ``backbone_weights`` names a weights
    file loaded into the backbone (fine-tuning, :func:`search.build.load_pretrained`). Raises
    :class:`TrialFailed` when the loss is not finite; a :class:`StopTraining` from ``on_epoch``
    ends training after that epoch.
    """
    start = time.perf_counter()
    if settings.epochs < 1:
        raise InvalidValue("training.epochs", settings.epochs, "an integer >= 1")
    if tune_memory:
        tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = autocast_dtype(device, settings.mixed_precision)
    torch.manual_seed(seed)
    model = build_model(architecture, data.num_classes, data.in_channels)
    pretrained: set[str] = set()
    if backbone_weights is not None:
        pretrained = load_pretrained(
            model, architecture, backbone_weights, keep_head=not settings.reset_head
        )
    if settings.identity_init(backbone_weights is not None):
        near_identity_(model)
    model = model.to(device)
    refusal = static_step_refusal(
        in_memory=not isinstance(data, StreamingData),
        scaler=amp is torch.float16,
        ema=settings.ema_decay is not None,
        compiled=settings.compile,
    )
    static = settings.cuda_graphs and refusal is None
    if settings.cuda_graphs and refusal is not None:
        log.warning("training.cuda_graphs: the usual step runs, since %s", refusal)
    loop = _Loop(
        model=model,
        forward=torch.compile(model) if settings.compile else model,
        optimizer=make_optimizer(
            model, settings, pretrained, fused=static, capturable=static and device.type == "cuda"
        ),
        scaler=torch.amp.GradScaler("cuda", enabled=amp is torch.float16),
        source=(
            _StreamingSource(data, device, settings.batch_size, seed)
            if isinstance(data, StreamingData)
            else _TensorSource(data, device, settings.batch_size)
        ),
        settings=settings,
        device=device,
        generator=torch.Generator(device=device).manual_seed(seed),
        norm=normalizer(data.mean, data.std, device),
        memory_format=_memory_format(settings.channels_last),
        amp=amp,
    )
    if static:
        tensor_learning_rates(loop.optimizer, device)
        loop.static = StaticStep(
            loop.forward, loop.optimizer, device, amp, settings.label_smoothing
        )
    if settings.ema_decay is not None:
        loop.ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True
        )
    if settings.flip_mode == "alternating" and not isinstance(data, StreamingData):
        loop.flips = torch.rand(len(data.train_y), generator=loop.generator, device=device) < 0.5

    curve: list[EpochReport] = []
    stopped: str | None = None
    images = 0
    for epoch in range(1, settings.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_accuracy, seen, lr = loop.train_epoch(epoch)
        train_seconds = time.perf_counter() - epoch_start
        images += seen
        val_loss, val_accuracy = loop.evaluate("val")
        report = EpochReport(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=lr,
            seconds=time.perf_counter() - epoch_start,
            images_per_s=seen / train_seconds,
        )
        curve.append(report)
        if on_epoch is not None:
            try:
                on_epoch(report)
            except StopTraining as stop:
                stopped = stop.reason
                break

    test = loop.evaluate("test") if stopped is None else None
    wall = time.perf_counter() - start
    return TrainResult(
        best_val_accuracy=max(r.val_accuracy for r in curve),
        final_val_accuracy=curve[-1].val_accuracy,
        test_accuracy=None if test is None else test[1],
        epochs_run=len(curve),
        wall_time_s=wall,
        images_per_s=images / wall,
        state_dict=_weights(model if loop.ema is None else loop.ema.module),
        curve=curve,
        stopped=stopped,
    )
