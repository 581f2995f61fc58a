"""The training step on static tensors (``training.cuda_graphs``): what a CUDA graph captures.

A CUDA graph replays recorded kernels on the memory they were recorded with, so everything a
step reads or writes must stay put: the batch is copied into fixed input buffers, the learning
rates are device tensors filled in place (the optimizer is the fused one, which reads a tensor
learning rate on the device), and the loss, the correct predictions and a non-finite flag are
summed into device tensors read once per epoch. No step reads anything back to the host.

On CUDA the step runs eagerly for :data:`WARMUP` steps (on a side stream, as PyTorch's
whole-network capture recipe does; the capture then records on that same stream), which creates
the gradients' and momentum's buffers and lets cuDNN pick its algorithms; the next step is
captured and every later one replays the graph.
Autocast runs without its weight-cast cache, which a graph cannot hold. Where capture fails
the step goes on eagerly and says why in the log. On the CPU it always runs eagerly: the same
arithmetic, so a CPU test checks what a GPU would capture.

Following https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture. Written here
rather than through ``torch.compile(mode="reduce-overhead")``, which graphs what Inductor
compiled but leaves the optimizer step outside, and whose compile takes longer than a short
trial.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WARMUP = 3
"""Eager steps before capture (PyTorch's recipe runs a few; DDP would need 11; no DDP here)."""

log = logging.getLogger(__name__)


class StaticStep:
    """One training step on static buffers; see the module docstring. ``optimizer``'s groups
    carry their learning rate as a 0-dim device tensor and an ``lr_scale``."""

    def __init__(
        self,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: torch.dtype | None,
        label_smoothing: float,
    ) -> None:
        self.forward = forward
        self.optimizer = optimizer
        self.device = device
        self.amp = amp
        self.label_smoothing = label_smoothing
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None
        self.capture = device.type == "cuda"
        self.steps = 0

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> None:
        """Train on ``x`` (normalised, in its memory format) and ``y`` at learning rate ``lr``."""
        if self.x is None or self.y is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.x.copy_(x)
        self.y.copy_(y)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * group["lr_scale"])
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.steps == WARMUP:
            self._capture()
        elif self.capture:
            self._side_stream_step()
        else:
            self._eager_step()
        self.steps += 1

    def read(self) -> tuple[float, int, bool]:
        """The epoch's summed loss, its correct predictions and whether any loss was not
        finite (one host synchronisation), and zero them for the next epoch."""
        out = (float(self.loss_sum), int(self.correct), bool(self.nonfinite))
        self.loss_sum.zero_()
        self.correct.zero_()
        self.nonfinite.zero_()
        return out

    def _body(self) -> None:
        assert self.x is not None and self.y is not None
        with torch.autocast(
            self.device.type, dtype=self.amp, enabled=self.amp is not None, cache_enabled=False
        ):
            logits = self.forward(self.x)
            loss = F.cross_entropy(logits, self.y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)
        self.correct += (logits.detach().argmax(1) == self.y).sum()

    def _eager_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._body()

    def _side_stream(self) -> torch.cuda.Stream:
        """One stream for the warm-up and the capture: libraries that cache a handle per stream
        (cuBLAS's workspace) then set it up before the capture, not during it."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        return self.stream

    def _side_stream_step(self) -> None:
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._eager_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self) -> None:
        """Record this step (recording runs nothing) and replay it; on failure, go on eagerly."""
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates them in the graph's pool
        try:
            with torch.cuda.graph(graph, stream=self._side_stream()):
                self._body()
        except RuntimeError as error:
            log.warning("CUDA graph capture failed, training on eagerly: %s", error)
            self.capture = False
            torch.cuda.synchronize(self.device)
            self._eager_step()
            return
        self.graph = graph
        graph.replay()


def static_step_refusal(*, in_memory: bool, scaler: bool, ema: bool, compiled: bool) -> str | None:
    """Why ``training.cuda_graphs`` cannot run this trial's step on static tensors (None: it
    can): streamed batches vary in size; fp16's gradient scaler and the weight average read
    values back to the host every step; ``torch.compile`` graphs its own way."""
    if not in_memory:
        return "the data are streamed (the last batch of an epoch is smaller)"
    if scaler:
        return "float16 needs a gradient scaler, which reads back every step (bfloat16 does not)"
    if ema:
        return "the weight average (ema_decay) reads back every step"
    if compiled:
        return "torch.compile is on"
    return None


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's learning rate as a 0-dim tensor on ``device`` (what a fused optimizer reads
    in a graph; :class:`StaticStep` fills them in place)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
