"""The fast recipe against the default: epochs to the same accuracy, and whether it ranks the
architectures alike.

A handful of architectures (no attention, SE, the paper's CBAM, channel-only and spatial-only
CBAM) train on the demo's data (cluttered digits, CIFAR ResNet-20, the demo's optimiser and
batch, no flips as the demo) under ``training.recipe: default`` and ``fast``
(``search.spec.fast_recipe``: label smoothing, a triangular learning rate, an average of the
weights; alternating flips do nothing without flips), with the worker's own training function
on one seed. Printed per architecture: the final validation accuracy under each recipe and the
first epoch at which the fast recipe reached the default's final accuracy; then the Spearman
rank agreement of the architectures' accuracies under the two recipes (scipy.stats), since a
recipe changes what a search ranks.

    python -m benchmarks.recipe [--epochs 8] [--num-train 1500] [--seed 0]

About 5 minutes on 2 CPU cores with the defaults; ``--epochs 2 --num-train 300`` checks the
plumbing in about a minute.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from scipy.stats import spearmanr

from benchmarks._timing import machine
from search.space import Architecture, reference_architectures
from search.spec import TrainingSpec
from workers.data import load_dataset
from workers.train import train

BACKBONE = "cifar_resnet20"
RECIPES = ("default", "fast")


def architectures() -> dict[str, Architecture]:
    references = reference_architectures(BACKBONE)
    return {
        "none": references["none"],
        "se": references["se"],
        "cbam (paper)": references["cbam"],
        "cbam channel": Architecture(BACKBONE, "cbam", arrangement="channel"),
        "cbam spatial k3": Architecture(BACKBONE, "cbam", arrangement="spatial", kernel_size=3),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(machine())
    options = {"num_train": args.num_train, "num_test": 300, "clutter": 2}
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset("cluttered-digits", options, Path(tmp), 0.2, 0)
    curves: dict[str, dict[str, list[float]]] = {}
    for recipe in RECIPES:
        settings = TrainingSpec.from_dict(
            {"recipe": recipe, "epochs": args.epochs, "batch_size": 64, "lr": 0.05, "flip": False}
        )
        for name, architecture in architectures().items():
            result = train(architecture, data, settings, seed=args.seed)
            curves.setdefault(name, {})[recipe] = [r.val_accuracy for r in result.curve]
            print(f"  {recipe:8s} {name:16s} {100 * result.final_val_accuracy:6.2f} %")
    print(
        f"\n{args.epochs} epochs, {data.sizes[0]} training / {data.sizes[1]} validation images, "
        f"seed {args.seed}"
    )
    print(f"{'architecture':16s} {'default':>8s} {'fast':>8s}  fast reaches default's final at")
    reached = []
    for name, by_recipe in curves.items():
        target = by_recipe["default"][-1]
        epoch = next((i + 1 for i, a in enumerate(by_recipe["fast"]) if a >= target), None)
        reached.append(epoch)
        where = f"epoch {epoch}" if epoch is not None else "never"
        print(f"{name:16s} {100 * target:7.2f}% {100 * by_recipe['fast'][-1]:7.2f}%  {where}")
    finals = {recipe: [curves[name][recipe][-1] for name in curves] for recipe in RECIPES}
    rho = spearmanr(finals["default"], finals["fast"]).statistic
    found = [e for e in reached if e is not None]
    if found:
        mean = sum(found) / len(found)
        print(
            f"fast reached the default's final accuracy in {len(found)}/{len(reached)} "
            f"architectures, at {mean:.1f} of {args.epochs} epochs on average "
            f"({mean / args.epochs:.2f}x)"
        )
    print(f"rank agreement of the two recipes (Spearman, {len(curves)} architectures): {rho:+.2f}")
    return curves


if __name__ == "__main__":
    main()
