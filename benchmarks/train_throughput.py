"""Images/s of a whole training trial: our loop against the loop users write by default.

CIFAR ResNet-20 with CBAM in every block, CIFAR-shaped synthetic uint8 data, the same images,
epochs, batch size and per-epoch validation for every variant:

* ours: ``workers.train.train`` (data in memory, batched crop + flip, fused CBAM, channels_last
  inputs, glibc allocator tuned), and the same without one ingredient each, to show where the gain
  comes from;
* default: a torch DataLoader over a Dataset with per-sample ``transforms.v2`` RandomCrop(32,
  padding=4) + RandomHorizontalFlip, the plain reference CBAM
  (``search.nn.cbam.reference_forward``),
  contiguous fp32 NCHW, SGD.

Every trial runs in a fresh child process (the allocator setting is process-wide), interleaved
round by round; a child first runs its loop for a few steps, as a worker process would have in an
earlier trial, then times the whole trial (model build, epochs, validation). Medians are printed,
with the ratio ours / default (target >= 1.5 on CPU).

    python -m benchmarks.train_throughput [--epochs 2] [--images 2560] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from benchmarks._timing import machine
from search.build import build_model
from search.nn.cbam import CBAM, reference_forward
from search.space import Architecture
from search.spec import TrainingSpec
from workers.data import DatasetTensors
from workers.train import train

ARCHITECTURE = Architecture("cifar_resnet20", "cbam")
SIZE, CLASSES = 32, 10
MEAN, STD = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)
# name -> (label, keyword overrides of our loop); "default" is the user's loop.
VARIANTS: dict[str, tuple[str, dict[str, bool]]] = {
    "ours": ("ours", {}),
    "ours-nchw": ("ours without channels_last", {"channels_last": False}),
    "ours-malloc": ("ours without tune_allocator", {"tune_memory": False}),
    "ours-refcbam": ("ours with the reference CBAM", {"reference_cbam": True}),
    "default": ("default loop (DataLoader, v2, reference CBAM, NCHW)", {}),
}


def synthetic(images: int, val_images: int) -> DatasetTensors:
    """CIFAR-shaped uint8 images with random labels (throughput does not depend on content)."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        return x, torch.randint(0, CLASSES, (n,), generator=g)

    (train_x, train_y), (val_x, val_y) = split(images), split(val_images)
    return DatasetTensors(
        "synthetic", train_x, train_y, val_x, val_y, None, None, CLASSES, 3, SIZE, MEAN, STD
    )


class TransformedImages(Dataset):
    """The usual Dataset: one image at a time through a transforms.v2 pipeline."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: v2.Transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.x[index]), self.y[index]


def use_reference_cbam() -> None:
    """Make every CBAM run the plain definition instead of the fused one (in this process)."""
    CBAM.forward = reference_forward


def default_loop(data: DatasetTensors, epochs: int, batch_size: int) -> float:
    """The loop users write by default; returns training images per second of the whole trial."""
    start = time.perf_counter()
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)]
    augment = [v2.RandomCrop(SIZE, padding=4), v2.RandomHorizontalFlip()]
    train_set = TransformedImages(data.train_x, data.train_y, v2.Compose(augment + normalize))
    val_set = TransformedImages(data.val_x, data.val_y, v2.Compose(normalize))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=batch_size)
    use_reference_cbam()
    model = build_model(ARCHITECTURE, data.num_classes, data.in_channels)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    images = 0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(y)
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x).argmax(1) == y).sum())
    return images / (time.perf_counter() - start)


def our_loop(data: DatasetTensors, epochs: int, batch_size: int, **options: bool) -> float:
    """``workers.train.train``; returns its images per second of the whole trial."""
    if options.pop("reference_cbam", False):
        use_reference_cbam()
    tune_memory = options.pop("tune_memory", True)
    settings = TrainingSpec(epochs=epochs, batch_size=batch_size, **options)
    return train(ARCHITECTURE, data, settings, seed=0, tune_memory=tune_memory).images_per_s


def child(args: argparse.Namespace) -> None:
    """One trial of one variant, after a short warm-up run; prints its images/s as JSON."""
    options = dict(VARIANTS[args.child][1])

    def run(data: DatasetTensors, epochs: int) -> float:
        if args.child == "default":
            return default_loop(data, epochs, args.batch_size)
        return our_loop(data, epochs, args.batch_size, **options)

    run(synthetic(2 * args.batch_size, args.val_images), 1)
    result = run(synthetic(args.images, args.val_images), args.epochs)
    print(json.dumps({"images_per_s": result}))


def run_child(variant: str, args: argparse.Namespace) -> float:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--child", variant]
    for flag in ("epochs", "images", "val_images", "batch_size", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=2560)
    parser.add_argument("--val-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    variants = args.variants.split(",")
    if "ours" not in variants or "default" not in variants:
        parser.error("--variants must include ours and default")
    print(
        f"Training throughput, whole trial: {ARCHITECTURE.backbone} + CBAM in every block, "
        f"{args.images} training + {args.val_images} validation images {SIZE}x{SIZE}, "
        f"{args.epochs} epochs, batch {args.batch_size}, fp32; {machine()}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            runs[variant].append(run_child(variant, args))
    medians = {v: statistics.median(r) for v, r in runs.items()}
    print(f"{'variant':<54} {'img/s':>7} {'vs ours':>8} {'vs default':>10}  runs")
    for variant in variants:
        m = medians[variant]
        each = " ".join(f"{r:.0f}" for r in runs[variant])
        print(
            f"{VARIANTS[variant][0]:<54} {m:7.0f} {m / medians['ours']:8.2f} "
            f"{m / medians['default']:10.2f}  {each}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ratio = medians["ours"] / medians["default"]
    print(f"ours / default = {ratio:.2f} (target >= 1.5)")


if __name__ == "__main__":
    main()
