"""The paper's two CBAM ablations, on bundled data, with their uncertainty.

Woo et al. (2018) ablate the channel gate's pooling (Table 1: avg+max 22.80 < avg 23.14 < max
23.20 % top-1 error, ResNet-50 on ImageNet, channel gate alone) and the order of the two gates
(Table 3: channel->spatial 22.66 < spatial->channel 22.78 < parallel 22.95 %), one run each.
Here: the whole CBAM module with its pooling changed, and its arrangement changed, on a CIFAR
ResNet-20 on cluttered digits, every row on the same ``--seeds`` training seeds (real runs,
``benchmarks/_runs.py``, at the confirmation schedule). Each row: the mean validation and test
accuracy with Student's t 95 % intervals, and the paired difference to no attention; then every
pair of rows within a table, paired on the shared seeds, Holm-corrected within the table: which
orderings the data support. The numbers are what came out; nothing is tuned to the paper.

    python -m benchmarks.paper_ablation [--seeds 12] [--epochs 8] [--jobs 2]

Shares its cached runs with ``benchmarks.ranking_reliability`` (which trains them at its
defaults); about 25 minutes on 2 CPU cores when nothing is cached.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping, Sequence

from benchmarks._runs import ARRANGEMENT, POOLING, REFERENCES, RunTable, Setting
from benchmarks._timing import machine
from search.space import Architecture
from search.stats import ALPHA, holm, mean_interval, paired_difference, verdict

PAPER = {
    "pooling": {"avg": 23.14, "max": 23.20, "avg+max": 22.80},
    "arrangement": {"channel→spatial": 22.66, "spatial→channel": 22.78, "parallel": 22.95},
}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2)
    return parser.parse_args(argv)


def _ci(values: Sequence[float]) -> str:
    interval = mean_interval([100 * v for v in values])
    low, high = interval.bounds or (float("nan"), float("nan"))
    return f"{interval.estimate:.2f} [{low:.2f}, {high:.2f}]"


def table(
    name: str,
    rows: Mapping[str, Architecture],
    runs: RunTable,
    seeds: Sequence[int],
    epochs: int,
) -> None:
    baseline = runs.scores(REFERENCES["none"], seeds, epochs)
    scores = {label: runs.scores(arch, seeds, epochs) for label, arch in rows.items()}
    print(f"\n{name} (paper: top-1 error %, ImageNet ResNet-50; here: accuracy %, n={len(seeds)})")
    print(
        f"  {'variant':<18}{'paper err':>10}{'params':>9}{'val acc [95% CI]':>24}"
        f"{'test acc [95% CI]':>24}{'Δ vs none [95% CI]':>26}"
    )
    for label, arch in rows.items():
        runs_ = [runs.get(arch, s, epochs) for s in seeds]
        tests = [r.test_accuracy for r in runs_ if r.test_accuracy is not None]
        diff = paired_difference([100 * v for v in scores[label]], [100 * v for v in baseline])
        low, high = diff.bounds or (float("nan"), float("nan"))
        delta = f"{diff.estimate:+.2f} [{low:+.2f}, {high:+.2f}]"
        print(
            f"  {label:<18}{PAPER[name][label]:>10.2f}{runs_[0].params:>9,}"
            f"{_ci(scores[label]):>24}{_ci(tests):>24}{delta:>26}"
        )
    pairs = list(itertools.combinations(rows, 2))
    diffs = [paired_difference(scores[a], scores[b]) for a, b in pairs]
    adjusted = holm([d.p_value for d in diffs])
    print("  orderings (paired t on shared seeds, Holm within the table):")
    for (a, b), d, p in zip(pairs, diffs, adjusted, strict=True):
        said = verdict(d, p, ALPHA)
        sign = {"better": ">", "worse": "<"}.get(said, "~")
        paper = "<" if PAPER[name][a] > PAPER[name][b] else ">"
        print(
            f"    {a} {sign} {b}: {100 * d.estimate:+.2f} points, adjusted p "
            f"{'n/a' if p is None else f'{p:.3f}'} ({said}; the paper has {a} {paper} {b})"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    runs = RunTable(Setting(num_train=args.num_train), jobs=args.jobs)
    seeds = list(range(1, args.seeds + 1))
    archs = [REFERENCES["none"], *POOLING.values(), *ARRANGEMENT.values()]
    runs.ensure([(a, s, args.epochs) for s in seeds for a in archs])
    print(
        f"paper ablation: {args.epochs} epochs, seeds {seeds[0]}-{seeds[-1]}\n"
        f"{runs.setting.describe()}\n{machine()}"
    )
    table("pooling", POOLING, runs, seeds, args.epochs)
    table("arrangement", ARRANGEMENT, runs, seeds, args.epochs)


if __name__ == "__main__":
    main()
