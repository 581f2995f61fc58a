"""GPU figures: our CBAM against timm's on CUDA, and whole training trials of CIFAR-sized ResNets.

1. One CBAM block (the paper's setting), forward + backward: ours, timm's ``CbamModule`` and the
   plain definition (``search.nn.cbam.reference_forward``), interleaved, at (64, 64, 32, 32),
   (64, 128, 16, 16), (64, 256, 8, 8) and (256, 256, 14, 14); NCHW and channels_last; fp32 and
   under autocast at the dtype training uses (bf16 where the card has it, else fp16), the input
   already in that dtype as a convolution under autocast hands it over. Medians in ms, and
   ours / timm (lower is better).
2. Whole trials of ``workers.train.train`` on the GPU (mixed precision, channels_last inputs,
   data held on the device, batched crop + flip): CIFAR ResNet-20 and ResNet-18 (torchvision's
   structure, as ``search.nn.backbones`` builds it) with CBAM in every block, on synthetic
   CIFAR-shaped uint8 data (32x32x3, 10 classes). The same loop with timm's CbamModule, with the
   plain definition, and without attention, interleaved round by round; images/s of the whole
   trial (model build, epochs, validation) and of the training steps alone (epochs after the
   first), and ours / timm in images/s (higher is better).

3. Several trials at once on one device (``cbam-nas worker --slots N``: each slot its own
   process): N processes, each training one trial of the same network (no attention, SE, CBAM
   in every block) from a common start, at N = 1, 2 and 4; the aggregate training images/s of
   all N (images trained by all / wall time from the start to the last one's end) and its
   ratio to one slot.

With part 2, whole trials with the usual (eager) step against the step on static tensors
captured as a CUDA graph (``training.cuda_graphs``), and their ratio.

``--quick`` runs all three at small settings (block rounds 10, one trial round, 5,120 images,
2 epochs), about five minutes on an H100/H200 in our estimate (not yet measured there).

It imports torch, timm, pydantic (the spec's models) and the project's ``search`` model code and
``workers.train`` only (not Optuna, SQLAlchemy or FastAPI), so it runs from a checkout on any
machine with those (``make gpu-wheels`` brings pydantic to one without it):

    PYTHONPATH=. python benchmarks/gpu.py [--device cuda:0] [--rounds 30] [--parts block,slots]
    PYTHONPATH=. python benchmarks/gpu.py --quick

Without a CUDA GPU it says so and exits with status 0 having measured nothing (so that
``make bench`` passes on CPU machines); a ``--device`` this machine lacks exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from timm.layers.cbam import CbamModule
from torch import nn

import workers.train as train_module
from benchmarks._timing import interleaved_medians
from benchmarks.train_throughput import synthetic
from search.nn.cbam import CBAM, reference_forward
from search.space import Architecture
from search.spec import TrainingSpec
from workers.data import DatasetTensors
from workers.train import autocast_dtype, train

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

BLOCK_SHAPES = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8), (256, 256, 14, 14)]
BACKBONES = {"cifar_resnet20": "CIFAR ResNet-20", "resnet18": "ResNet-18"}
# name -> label; "ours" is the project's fused CBAM, the others are swapped in for it.
VARIANTS = {
    "ours": "ours (search.nn.cbam.CBAM)",
    "timm": "timm CbamModule",
    "plain": "plain CBAM definition",
    "none": "no attention",
}
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def cuda_device(name: str) -> torch.device | None:
    """The CUDA device to measure on; None (after saying why) when there is none to use."""
    if not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py: no CUDA GPU here (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False): "
            "nothing measured. Run it on a machine with an NVIDIA GPU."
        )
        return None
    device = torch.device(name)
    if device.type != "cuda":
        raise SystemExit(f"benchmarks/gpu.py: --device must be cuda or cuda:N, not {name!r}")
    index = torch.cuda.current_device() if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        allowed = ", ".join(f"cuda:{i}" for i in range(count))
        print(f"benchmarks/gpu.py: --device {name!r} is not here; allowed: {allowed}")
        raise SystemExit(2)
    return torch.device("cuda", index)


def describe(device: torch.device, amp: torch.dtype | None) -> str:
    props = torch.cuda.get_device_properties(device)
    return (
        f"{torch.cuda.get_device_name(device)} (compute capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; autocast dtype "
        f"{str(amp).removeprefix('torch.')} (bf16 supported: {torch.cuda.is_bf16_supported()}); "
        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 "
        f"{torch.backends.cudnn.allow_tf32}; cudnn.benchmark on"
    )


# -- 1. one CBAM block -----------------------------------------------------------------------


def block_candidates(
    shape: tuple[int, int, int, int],
    layout: torch.memory_format,
    amp: torch.dtype | None,
    device: torch.device,
    inner: int,
) -> dict[str, Callable[[], None]]:
    """ours / timm / plain forward + backward, ``inner`` times per call."""
    torch.manual_seed(0)
    channels = shape[1]
    ours = CBAM(channels).to(device)
    plain = copy.deepcopy(ours)
    timm = CbamModule(channels).to(device)
    dtype = amp or torch.float32
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout)
    x.requires_grad_()
    grad = torch.randn_like(x)
    modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ours": ours,
        "timm": timm,
        "plain": lambda t: reference_forward(plain, t),
    }

    def run(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        grads: dict[torch.dtype, torch.Tensor] = {}

        def forward_backward() -> None:
            for _ in range(inner):
                x.grad = None
                with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                    out = module(x)
                if out.dtype not in grads:  # timm's output may come out in another dtype
                    grads[out.dtype] = grad.to(out.dtype)
                out.backward(grads[out.dtype])

        return forward_backward

    return {name: run(module) for name, module in modules.items()}


def block_table(device: torch.device, amp: torch.dtype, rounds: int, inner: int) -> None:
    print("\n### CBAM block, forward + backward, medians in ms\n")
    print("| shape (B, C, H, W) | precision | layout | ours | timm | plain | ours / timm |")
    print("|---|---|---|---|---|---|---|")
    worst: dict[str, float] = {}
    for shape in BLOCK_SHAPES:
        for precision, dtype in (("fp32", None), (str(amp).removeprefix("torch."), amp)):
            for layout_name, layout in LAYOUTS.items():
                candidates = block_candidates(shape, layout, dtype, device, inner)
                t = {k: v / inner for k, v in interleaved_medians(candidates, rounds).items()}
                ratio = t["ours"] / t["timm"]
                worst[precision] = max(worst.get(precision, 0.0), ratio)
                print(
                    f"| {', '.join(map(str, shape))} | {precision} | "
                    f"{'channels_last' if layout_name == 'cl' else 'NCHW'} | {t['ours']:.3f} | "
                    f"{t['timm']:.3f} | {t['plain']:.3f} | {ratio:.2f} |"
                )
                del candidates
                torch.cuda.empty_cache()
    for precision, ratio in worst.items():
        print(f"\nworst forward+backward ours / timm at {precision} = {ratio:.2f}")


# -- 2. whole trials -------------------------------------------------------------------------


class _PlainCBAM(CBAM):
    """Our CBAM's parameters through the plain definition (autograd does the backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_forward(self, x)


def _swap_attention(model: nn.Module, variant: str) -> nn.Module:
    """Put timm's CbamModule (fresh) or the plain definition (same parameters) where our CBAM is."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not CBAM:
                continue
            if variant == "timm":
                setattr(parent, name, CbamModule(child.channels))
            elif variant == "plain":
                child.__class__ = _PlainCBAM
    return model


@contextlib.contextmanager
def attention_variant(variant: str) -> Iterator[None]:
    """While open, ``workers.train.train`` builds its models with ``variant``'s attention."""
    if variant not in ("timm", "plain"):
        yield
        return
    original = train_module.build_model

    def build(*args: object, **kwargs: object) -> nn.Module:
        return _swap_attention(original(*args, **kwargs), variant)

    train_module.build_model = build
    try:
        yield
    finally:
        train_module.build_model = original


def one_trial(
    backbone: str, variant: str, data: DatasetTensors, settings: TrainingSpec, device: torch.device
) -> tuple[float, float]:
    """(images/s of the whole trial, median images/s of the training steps after epoch 1)."""
    architecture = Architecture(backbone, "none" if variant == "none" else "cbam")
    with attention_variant(variant):
        result = train(architecture, data, settings, seed=0, device=device)
    steady = [r.images_per_s for r in result.curve[1:]] or [result.curve[0].images_per_s]
    return result.images_per_s, statistics.median(steady)


def train_table(device: torch.device, args: argparse.Namespace) -> None:
    settings = TrainingSpec(
        epochs=args.epochs, batch_size=args.batch_size, mixed_precision=True, channels_last=True
    )
    data = synthetic(args.images, args.val_images)
    warmup = synthetic(4 * args.batch_size, args.batch_size)
    warm_settings = TrainingSpec(epochs=1, batch_size=args.batch_size)
    print(
        f"\n### Whole trials (`workers.train.train`): {args.images} training + "
        f"{args.val_images} validation images 32x32x3, {args.epochs} epochs, batch "
        f"{args.batch_size}, mixed precision, channels_last; medians of {args.trial_rounds}\n"
    )
    print("| network | attention | trial images/s | training images/s | ours / this |")
    print("|---|---|---|---|---|")
    for backbone, label in BACKBONES.items():
        for variant in VARIANTS:  # CUDA context, cuDNN autotuning, allocator pools
            one_trial(backbone, variant, warmup, warm_settings, device)
        runs: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.trial_rounds):
            for variant in VARIANTS:
                runs[variant].append(one_trial(backbone, variant, data, settings, device))
        trial = {v: statistics.median(r[0] for r in runs[v]) for v in VARIANTS}
        steps = {v: statistics.median(r[1] for r in runs[v]) for v in VARIANTS}
        for variant, name in VARIANTS.items():
            ratio = "" if variant == "ours" else f"{trial['ours'] / trial[variant]:.2f}"
            print(f"| {label} | {name} | {trial[variant]:.0f} | {steps[variant]:.0f} | {ratio} |")
        print(
            f"\n{label}: ours / timm = {trial['ours'] / trial['timm']:.2f} in images/s of the "
            f"whole trial (higher is better)\n"
        )


def graphs_table(device: torch.device, args: argparse.Namespace) -> None:
    """Whole trials with the usual step against the step on static tensors, captured as a CUDA
    graph (``training.cuda_graphs``), for no attention and ours."""
    data = synthetic(args.images, args.val_images)
    print(
        f"\n### The training step as a CUDA graph (`training.cuda_graphs`): the same trials; "
        f"medians of {args.trial_rounds}\n"
    )
    print("| network | attention | eager images/s | graphs images/s | graphs / eager |")
    print("|---|---|---|---|---|")
    for backbone, label in BACKBONES.items():
        for variant in ("none", "ours"):
            figures = {}
            for graphs in (False, True):
                settings = TrainingSpec(
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    mixed_precision=True,
                    channels_last=True,
                    cuda_graphs=graphs,
                )
                runs = [
                    one_trial(backbone, variant, data, settings, device)[0]
                    for _ in range(args.trial_rounds)
                ]
                figures[graphs] = statistics.median(runs)
            print(
                f"| {label} | {VARIANTS[variant]} | {figures[False]:.0f} | {figures[True]:.0f} "
                f"| {figures[True] / figures[False]:.2f} |"
            )


# -- 3. several trials per device ---------------------------------------------------------------

SLOT_COUNTS = (1, 2, 4)
SLOT_VARIANTS = {"none": "no attention", "se": "SE", "cbam": "CBAM"}


def _slot(
    backbone: str,
    attention: str,
    device: str,
    sizes: tuple[int, int, int, int],
    start: Barrier,
    results: Queue[tuple[int, float]],
) -> None:
    """One slot's process: warm up (CUDA context, cuDNN autotuning), wait for the others, train
    one trial; put (images trained, seconds) on ``results``."""
    images, val_images, epochs, batch = sizes
    torch.set_num_threads(1)
    architecture = Architecture(backbone, attention)
    warm = TrainingSpec(epochs=1, batch_size=batch)
    train(architecture, synthetic(2 * batch, batch), warm, seed=0, device=device)
    data = synthetic(images, val_images)
    settings = TrainingSpec(epochs=epochs, batch_size=batch)
    start.wait()
    began = time.perf_counter()
    result = train(architecture, data, settings, seed=0, device=device)
    results.put((round(result.images_per_s * result.wall_time_s), time.perf_counter() - began))


def concurrent_trials(
    backbone: str,
    attention: str,
    slots: int,
    device: str,
    sizes: tuple[int, int, int, int],
    timeout_s: float = 600.0,
) -> float:
    """Aggregate training images/s of ``slots`` processes each training one trial of
    ``backbone`` with ``attention`` on ``device``, started together; ``sizes`` is (training
    images, validation images, epochs, batch size)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into a child
    start, results = context.Barrier(slots + 1), context.Queue()
    processes = [
        context.Process(target=_slot, args=(backbone, attention, device, sizes, start, results))
        for _ in range(slots)
    ]
    for process in processes:
        process.start()
    try:
        start.wait(timeout=timeout_s)
        began = time.perf_counter()
        done = [results.get(timeout=timeout_s) for _ in processes]
        wall = time.perf_counter() - began
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return sum(images for images, _ in done) / wall


def slots_table(device: torch.device, args: argparse.Namespace) -> None:
    sizes = (args.images, args.val_images, args.epochs, args.batch_size)
    print(
        f"\n### Several trials per device: N processes, one trial each ({args.images} images "
        f"32x32x3, {args.epochs} epochs, batch {args.batch_size}, mixed precision), started "
        "together; aggregate training images/s, eager (no CUDA graphs)\n"
    )
    header = " | ".join(f"{n} slot{'s' if n > 1 else ''}" for n in SLOT_COUNTS)
    print(f"| network | attention | {header} | {SLOT_COUNTS[-1]} / 1 |")
    print("|---|---|" + "---|" * (len(SLOT_COUNTS) + 1))
    for backbone, label in BACKBONES.items():
        for attention, name in SLOT_VARIANTS.items():
            rates = [
                concurrent_trials(backbone, attention, n, str(device), sizes) for n in SLOT_COUNTS
            ]
            cells = " | ".join(f"{r:.0f}" for r in rates)
            print(f"| {label} | {name} | {cells} | {rates[-1] / rates[0]:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--parts", default="block,train,slots", help="block, train, slots")
    parser.add_argument(
        "--quick", action="store_true", help="the device check: all parts at small settings"
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per block case")
    parser.add_argument("--inner", type=int, default=10, help="passes per timed block call")
    parser.add_argument("--images", type=int, default=10240)
    parser.add_argument("--val-images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--trial-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.trial_rounds, args.images, args.epochs = 10, 1, 5120, 2
    parts = set(args.parts.split(","))
    if not parts or parts - {"block", "train", "slots"}:
        parser.error("--parts: a comma-separated choice of block, train, slots")
    device = cuda_device(args.device)
    if device is None:
        return 0
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    amp = autocast_dtype(device, True)
    assert amp is not None
    print(f"GPU benchmarks on {describe(device, amp)}")
    if "block" in parts:
        block_table(device, amp, args.rounds, args.inner)
    if "train" in parts:
        train_table(device, args)
        graphs_table(device, args)
    if "slots" in parts:
        slots_table(device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
