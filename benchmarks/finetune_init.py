"""Fine-tuning a pretrained backbone with inserted CBAM: near-identity init against the paper's.

Transfer learning on bundled data (scikit-learn's digits, grey 16x16, one fixed train /
validation / test split). Source task: digits 0-4; the backbone without attention is pretrained
on it for ``--pretrain-epochs`` (lr 0.1) with the worker's own training function, and its
weights (``TrainResult.state_dict``) are saved with safetensors. Target task: digits 5-9
relabelled 0-4. Each arm trains on it for ``--epochs`` with the same settings (SGD lr
``--lr``, every weight loaded from the file at ``lr * --backbone-lr-scale``, cosine schedule,
batch 32, crops with 2 pixels of padding, no flips):

* ``cbam paper``: the paper's CBAM in every block, backbone from the file, the authors' init;
* ``cbam identity``: the same with every CBAM gate starting at sigmoid(3) = 0.95;
* ``none``: the backbone without attention from the same file (the reference);
* ``cbam scratch``: the paper's CBAM, paper init, no weights loaded (for scale).

The source model has a 10-way classifier (its labels use 5 outputs), so the file's classifier
does not fit the 5-way target and is skipped: each fine-tuned arm gets a fresh classifier at
``lr``, as from an ImageNet checkpoint. Every seed pretrains its own file and trains all arms
with that seed (paired design). Printed per arm: the mean validation accuracy after epoch 1, 2
and the last, with Student's t 95 % intervals, and the mean test accuracy; then the paired
difference identity - paper at epoch 1 and at the end (t interval, ``scipy.stats.ttest_rel``).

    python -m benchmarks.finetune_init [--seeds 16] [--backbone-lr-scale 0.1] [--quick]

About 3 minutes on 2 CPU cores with the defaults (one thread); ``--quick`` (3 seeds) under 1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from scipy import stats

from benchmarks._timing import machine
from search.build import build_model, load_pretrained
from search.nn.weights import near_identity_
from search.space import Architecture, reference_architectures
from search.spec import TrainingSpec
from workers.data import DatasetTensors, load_dataset
from workers.data.base import channel_stats
from workers.train import TrainResult, train

BACKBONES = ("timm:test_resnet", "cifar_resnet20")
SOURCE = (0, 1, 2, 3, 4)
TARGET = (5, 6, 7, 8, 9)
# The source model's classifier has 10 outputs (its labels use 5): the file's classifier then
# does not fit the 5-way target and load_pretrained skips it, so every fine-tuned arm starts
# with a fresh classifier at the full learning rate, as from an ImageNet checkpoint. With a
# 5-way source head it would load (same class count), mapping the wrong digits.
SOURCE_HEAD = 10
ARMS = ("cbam paper", "cbam identity", "none", "cbam scratch")


def subset(data: DatasetTensors, classes: Sequence[int], num_classes: int = 0) -> DatasetTensors:
    """``data`` restricted to ``classes``, relabelled 0.. in that order; the same split, with
    the mean and std of the kept training images (as the loader computes them). A model for it
    gets ``num_classes`` outputs (0: one per class)."""
    lookup = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lookup[list(classes)] = torch.arange(len(classes))

    def keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = lookup[y] >= 0
        return x[mask], lookup[y[mask]]

    train_x, train_y = keep(data.train_x, data.train_y)
    val_x, val_y = keep(data.val_x, data.val_y)
    test_x, test_y = (None, None)
    if data.test_x is not None and data.test_y is not None:
        test_x, test_y = keep(data.test_x, data.test_y)
    mean, std = channel_stats(train_x)
    names = data.class_names
    return DatasetTensors(
        name=f"{data.name}[{','.join(map(str, classes))}]",
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes or len(classes),
        in_channels=data.in_channels,
        image_size=data.image_size,
        mean=mean,
        std=std,
        class_names=None if names is None else tuple(names[c] for c in classes),
    )


def settings(epochs: int, lr: float, backbone_lr_scale: float, init: str) -> TrainingSpec:
    return TrainingSpec.from_dict(
        {
            "epochs": epochs,
            "batch_size": 32,
            "lr": lr,
            "flip": False,
            "crop_padding": 2,
            "backbone_lr_scale": backbone_lr_scale,
            "attention_init": init,
        }
    )


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and Student's t 95 % interval (nan bounds for fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean of a - b, its t 95 % interval and the paired t-test's p-value (nan if a == b)."""
    mean, low, high = interval([x - y for x, y in zip(a, b, strict=True)])
    p = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 else math.nan
    return mean, low, high, p


def _fmt(values: Sequence[float]) -> str:
    mean, low, high = interval([100 * v for v in values])
    return f"{mean:6.2f} [{low:6.2f}, {high:6.2f}]"


def main(argv: list[str] | None = None) -> dict[str, list[TrainResult]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=BACKBONES, default="timm:test_resnet")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backbone-lr-scale", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="3 seeds")
    args = parser.parse_args(argv)
    seeds = range(3 if args.quick else args.seeds)
    torch.set_num_threads(1)
    print(machine())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        digits = load_dataset("digits", {"size": 16}, Path(tmp), 0.2, 0)
    assert isinstance(digits, DatasetTensors)
    source = subset(digits, SOURCE, num_classes=SOURCE_HEAD)
    target = subset(digits, TARGET)
    references = reference_architectures(args.backbone)
    plain, cbam = references["none"], references["cbam"]
    pretrain = settings(args.pretrain_epochs, 0.1, 1.0, "paper")
    finetune = {
        init: settings(args.epochs, args.lr, args.backbone_lr_scale, init)
        for init in ("paper", "identity")
    }
    arms: dict[str, tuple[Architecture, TrainingSpec, bool]] = {
        "cbam paper": (cbam, finetune["paper"], True),
        "cbam identity": (cbam, finetune["identity"], True),
        "none": (plain, finetune["paper"], True),
        "cbam scratch": (cbam, finetune["paper"], False),
    }
    print(
        f"{args.backbone}; source digits {SOURCE} ({source.sizes[0]} train / {source.sizes[1]} "
        f"val), target digits {TARGET} as 0-4 ({target.sizes[0]} train / {target.sizes[1]} val"
        f" / {target.sizes[2]} test)"
    )
    print(
        f"pretrain {args.pretrain_epochs} epochs lr 0.1; fine-tune {args.epochs} epochs lr "
        f"{args.lr}, backbone_lr_scale {args.backbone_lr_scale}, batch 32, cosine; "
        f"{len(seeds)} seeds"
    )
    results: dict[str, list[TrainResult]] = {arm: [] for arm in ARMS}
    pretrained: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            base = train(plain, source, pretrain, seed=seed, threads=1)
            pretrained.append(base.final_val_accuracy)
            path = Path(tmp) / f"source-{seed}.safetensors"
            save_file({k: v.contiguous() for k, v in base.state_dict.items()}, str(path))
            if seed == seeds[0]:
                model = build_model(cbam, target.num_classes, target.in_channels)
                loaded = load_pretrained(model, cbam, path)
                head = cbam.info.classifier_weight.rpartition(".")[0]
                fresh = not any(k.rpartition(".")[0] == head for k in loaded)
                print(
                    f"the file loads {len(loaded)} of {len(base.state_dict)} tensors into the "
                    f"CBAM model (classifier left out: {fresh}); "
                    f"near_identity_ sets {near_identity_(model)} CBAM modules"
                )
            line = [f"  seed {seed}: source val {100 * base.final_val_accuracy:6.2f}"]
            for arm, (architecture, spec, load) in arms.items():
                result = train(
                    architecture,
                    target,
                    spec,
                    seed=seed,
                    threads=1,
                    backbone_weights=path if load else None,
                )
                results[arm].append(result)
                line.append(f"{arm} {100 * result.final_val_accuracy:6.2f}")
            print(" | ".join(line), flush=True)
    last = args.epochs
    print(f"\nsource task, pretrained backbone: val {_fmt(pretrained)} %")
    print(
        f"target task, val accuracy % (mean [95% CI], n={len(seeds)}):\n"
        f"{'arm':<15}{'epoch 1':>24}{'epoch 2':>24}{f'epoch {last}':>24}{'test':>8}"
    )

    def at(arm: str, epoch: int) -> list[float]:
        return [r.curve[epoch - 1].val_accuracy for r in results[arm]]

    for arm in ARMS:
        tests = [r.test_accuracy for r in results[arm] if r.test_accuracy is not None]
        cells = "".join(f"{_fmt(at(arm, e)):>24}" for e in (1, min(2, last), last))
        print(f"{arm:<15}{cells}{100 * statistics.fmean(tests):>8.2f}")
    print("\nidentity - paper, paired on seeds (points, mean [95% CI], paired t p):")
    summary = []
    for epoch in (1, last):
        mean, low, high, p = paired(
            [100 * v for v in at("cbam identity", epoch)],
            [100 * v for v in at("cbam paper", epoch)],
        )
        print(f"  epoch {epoch}: {mean:+.2f} [{low:+.2f}, {high:+.2f}], p={p:.3g}")
        points = " points" if epoch == 1 else ""
        summary.append(
            f"{mean:+.1f}{points} at epoch {epoch} (95% CI [{low:.1f}, {high:.1f}], p={p:.2g})"
        )
    tests = {arm: [r.test_accuracy or 0.0 for r in results[arm]] for arm in ARMS}
    mean, low, high, p = paired(
        [100 * v for v in tests["cbam identity"]], [100 * v for v in tests["cbam paper"]]
    )
    print(f"  test:    {mean:+.2f} [{low:+.2f}, {high:+.2f}], p={p:.3g}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    print(f"identity init vs paper init, fine-tuning: {summary[0]}, {summary[1]}")
    return results


if __name__ == "__main__":
    main()
