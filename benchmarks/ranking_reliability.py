"""Can a search's answer be trusted? A/A, repeatability, racing's cost and the rungs' information.

Real training runs (``benchmarks/_runs.py``: the worker's training function, cluttered digits,
CIFAR ResNet-20), each (architecture, seed, schedule) trained once, and searches replayed over
them through the product's own racing, confirmed board and early-stopping code:

- **A/A**: the paper's CBAM entered as two arms, each on its own seeds (drawn without
  replacement from ``--aa-seeds`` real runs, so repeats share runs: they are resamples, not
  independent experiments), raced and boarded ``--aa-repeats`` times. Declared different: the
  race stopped one arm, or the board left one out of the top group. Target: at most alpha (5 %)
  within its binomial margin.
- **Repeatability**: ``--searches`` searches that differ only in their spec seed (the
  exploration's seed and the confirmation's seeds). A pair agrees when each recommendation is in
  the other's top group (statistically tied). Target: >= 90 % of pairs.
- **Cost**: the epochs the race spends against every arm on ``max_seeds`` seeds, at the spec's
  default ``max_seeds`` (5) and at each of ``--cost-max-seeds``. Target: <= 50 %.
- **Rungs**: per successive-halving rung of either schedule, Spearman's rho between the
  accuracies there and the final ones (no stopping: every run ran to the end); and successive
  halving replayed over the exploration with the plain rule (stop below the cut) and with the
  noise-aware rule (stop only below it beyond the split's Wilson noise, never at chance): how
  much each stops, saves, and how often it stopped the eventual best.

    python -m benchmarks.ranking_reliability [--searches 8] [--explore-epochs 3]
        [--confirm-epochs 8] [--aa-seeds 20] [--jobs 2]

The runs are cached (``.cbam-nas/benchmark-runs.jsonl``) and shared with
``benchmarks.fidelity`` and ``benchmarks.paper_ablation``; about 40 minutes on 2 CPU cores the
first time, seconds after.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
from collections.abc import Sequence

from scipy import stats as scipy_stats

from benchmarks._runs import (
    ALL,
    REFERENCES,
    Replay,
    Run,
    RunTable,
    Setting,
    board_row,
    confirm_seeds,
    replay,
    search_spec,
)
from benchmarks._timing import machine
from search.results.leaderboard import confirmed_board
from search.spec import EarlyStoppingSpec, SearchSpec
from search.stats import mean_interval, rank_agreement, wilson_interval
from search.study.confirmation import race
from search.study.early_stopping import rung_cut, worse_beyond_noise

CHANCE = 0.1  # ten digit classes


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--searches", type=int, default=8)
    parser.add_argument("--explore-epochs", type=int, default=3)
    parser.add_argument("--confirm-epochs", type=int, default=8)
    parser.add_argument("--aa-seeds", type=int, default=20)
    parser.add_argument("--aa-repeats", type=int, default=400)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cost-max-seeds", type=int, nargs="*", default=[10])
    return parser.parse_args(argv)


def share(k: int, n: int) -> str:
    """``k`` of ``n`` as a percentage with its exact (Clopper-Pearson) 95 % interval."""
    ci = scipy_stats.binomtest(k, n).proportion_ci()
    return f"{100 * k / n:.1f} % ({k}/{n}; 95 % CI {100 * ci.low:.1f}-{100 * ci.high:.1f})"


def prepare(args: argparse.Namespace) -> tuple[RunTable, list[Replay], dict[int, list[Replay]]]:
    """Train what is missing; replay the searches (the spec's defaults), and again at each of
    ``--cost-max-seeds`` (for the cost only)."""
    table = RunTable(Setting(num_train=args.num_train), jobs=args.jobs)

    def specs(**confirm: int) -> list[SearchSpec]:
        return [
            search_spec(table.setting, s, args.explore_epochs, args.confirm_epochs, **confirm)
            for s in range(args.searches)
        ]

    default = specs()
    longer = {m: specs(max_seeds=m) for m in args.cost_max_seeds}
    every = default + [spec for group in longer.values() for spec in group]
    long_seeds = sorted({seed for spec in every for seed in confirm_seeds(spec)})
    plan = [(a, s.seed, args.explore_epochs) for s in default for a in ALL]
    plan += [(a, seed, args.confirm_epochs) for seed in long_seeds for a in ALL]
    plan += [(REFERENCES["cbam"], seed, args.confirm_epochs) for seed in aa_seeds(args)]
    seconds = table.ensure(plan)
    if seconds:
        print(f"trained in {seconds / 60:.1f} min")
    replays = [replay(table, spec) for spec in default]
    return (
        table,
        replays,
        {m: [replay(table, spec) for spec in group] for m, group in longer.items()},
    )


def aa_seeds(args: argparse.Namespace) -> list[int]:
    return list(range(1, args.aa_seeds + 1))


def noise(table: RunTable, replays: Sequence[Replay], args: argparse.Namespace) -> None:
    """Each architecture's spread over seeds, against one run's binomial noise."""
    seeds = sorted({s for r in replays for s in confirm_seeds(r.spec)})
    explore = [r.spec.seed for r in replays]
    print("\nnoise: accuracy over seeds (mean, standard deviation in points)")
    print(f"  {'architecture':<32}{'explore':>22}{'confirm':>22}")
    for arch in ALL:
        cells = []
        for epochs, on in ((args.explore_epochs, explore), (args.confirm_epochs, seeds)):
            values = table.scores(arch, on, epochs)
            cells.append(
                f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
                f" (n={len(values)})"
            )
        print(f"  {arch.describe():<32}{cells[0]:>22}{cells[1]:>22}")
    half = wilson_interval(0.95, table.setting.val_images)
    print(
        f"  one run's 95 % Wilson interval at 95 % on {table.setting.val_images} images: "
        f"{100 * half.low:.1f}-{100 * half.high:.1f}"
    )


def aa(table: RunTable, args: argparse.Namespace) -> None:
    """Identical arms on distinct seeds: how often does racing or the board tell them apart?"""
    spec = search_spec(table.setting, 0, args.explore_epochs, args.confirm_epochs)
    runs = [table.get(REFERENCES["cbam"], s, args.confirm_epochs) for s in aa_seeds(args)]
    per_arm = spec.confirm.max_seeds
    rng = random.Random(0)
    stopped = different = 0
    for _ in range(args.aa_repeats):
        drawn = rng.sample(runs, 2 * per_arm)
        sides = [drawn[:per_arm], drawn[per_arm:]]
        results: dict[tuple[int, int], float] = {}
        while not (state := race(spec, 2, results, len(results))).finished:
            for arm in state.active:
                results[(arm, state.round)] = sides[arm][state.round].val_accuracy
        stopped += bool(state.stopped)
        rows = [
            {**_row(sides[arm][r], table), "arch_id": f"arm{arm}", "seed": r} for arm, r in results
        ]
        board = confirmed_board(rows, "params", spec.confirm.alpha, spec.confirm.looks)
        different += len(board.top_group) < 2
    print(
        f"\nA/A: the paper's CBAM against itself on distinct seeds, {args.aa_repeats} races "
        f"resampled from {len(runs)} runs ({args.confirm_epochs} epochs), alpha "
        f"{spec.confirm.alpha}"
    )
    print(f"  race stopped an arm:             {share(stopped, args.aa_repeats)}")
    print(f"  board split the top group:       {share(different, args.aa_repeats)}")


def _row(run: Run, table: RunTable) -> dict[str, object]:
    return {**board_row(run, REFERENCES["cbam"], table.setting.val_images), "reference": None}


def repeatability(replays: Sequence[Replay]) -> None:
    print("\nrepeatability: the same search under different spec seeds")
    for r in replays:
        board = r.board
        label = {e["arch_id"]: e["label"] for e in board.entries}
        top = ", ".join(label[a] for a in board.top_group)
        print(
            f"  seed {r.spec.seed}: recommends {label[board.recommended]:<28} "
            f"top group [{top}]; explored best {r.winner.label}"
        )
    pairs = list(itertools.combinations(replays, 2))
    agree = sum(
        a.board.recommended in b.board.top_group and b.board.recommended in a.board.top_group
        for a, b in pairs
    )
    same = sum(a.board.recommended == b.board.recommended for a, b in pairs)
    print(f"  pairs whose recommendations are tied: {share(agree, len(pairs))}")
    print(f"  pairs with the same recommendation:   {share(same, len(pairs))}")
    print("  (pairs share runs where their confirmation seeds overlap: not independent)")


def cost(replays: Sequence[Replay]) -> None:
    ratios = [r.confirm_epochs / r.naive_epochs for r in replays]
    spent = sum(r.confirm_epochs for r in replays)
    naive = sum(r.naive_epochs for r in replays)
    print(
        f"\ncost at max_seeds {replays[0].spec.confirm.max_seeds}: racing spent {spent} "
        f"confirmation epochs where every arm on every seed would spend {naive}: "
        f"{100 * spent / naive:.0f} % "
        f"(per search {100 * min(ratios):.0f}-{100 * max(ratios):.0f} %)"
    )


def rungs(table: RunTable, replays: Sequence[Replay], args: argparse.Namespace) -> None:
    stopping = EarlyStoppingSpec()
    seeds = {
        args.explore_epochs: [r.spec.seed for r in replays],
        args.confirm_epochs: sorted({s for r in replays for s in confirm_seeds(r.spec)}),
    }
    print(
        "\nrungs: Spearman's rho between each rung's accuracies and the final ones, per seed "
        "over the 7 architectures (mean over seeds with its t interval; every run complete)"
    )
    for epochs, on in seeds.items():
        for rung in stopping.rungs(epochs):
            rhos = []
            for seed in on:
                runs = [table.get(a, seed, epochs) for a in ALL]
                rho = rank_agreement(
                    [r.curve[rung - 1] for r in runs], [r.val_accuracy for r in runs]
                )
                if not math.isnan(rho.estimate):  # undefined where a rung's scores all tie
                    rhos.append(rho.estimate)
            m = mean_interval(rhos)
            low, high = m.bounds or (float("nan"), float("nan"))
            low, high = max(low, -1.0), min(high, 1.0)  # clip a t interval to rho
            print(
                f"  {epochs}-epoch schedule, rung at epoch {rung}: rho {m.estimate:+.2f} "
                f"[{low:+.2f}, {high:+.2f}] over {len(rhos)} seeds"
            )
    halving(table, replays, args)


def halving(table: RunTable, replays: Sequence[Replay], args: argparse.Namespace) -> None:
    """Successive halving replayed over each exploration (trials in a seeded random order),
    with the plain rule and with the noise-aware rule."""
    stopping = EarlyStoppingSpec()
    epochs = args.explore_epochs
    if not stopping.rungs(epochs):
        print(f"\nsuccessive halving: no rung in a {epochs}-epoch exploration")
        return
    val_images = table.setting.val_images
    rules = {
        "plain (below the cut)": lambda acc, cut: acc < cut,
        "noise-aware (product)": lambda acc, cut: worse_beyond_noise(acc, cut, val_images, CHANCE),
    }
    print(
        f"\nsuccessive halving over the {epochs}-epoch explorations (rungs "
        f"{stopping.rungs(epochs)}, reduction factor {stopping.reduction_factor}, judged after "
        f"{stopping.min_trials_at_rung} trials)"
    )
    for name, stop in rules.items():
        stopped_runs = lost = saved = total = 0
        survivors_rho = []
        for r in replays:
            runs = [table.get(a, r.spec.seed, epochs) for a in ALL]
            order = random.Random(r.spec.seed).sample(runs, len(runs))
            best = max(runs, key=lambda run: run.val_accuracy)
            at_rung: dict[int, list[float]] = {}
            kept = []
            for run in order:
                ran = epochs
                for rung in stopping.rungs(epochs):
                    acc, others = run.curve[rung - 1], at_rung.setdefault(rung, [])
                    judged = len(others) >= stopping.min_trials_at_rung
                    cut = rung_cut(acc, others, stopping.reduction_factor)
                    others.append(acc)
                    if judged and stop(acc, cut):
                        ran = rung
                        break
                total += epochs
                saved += epochs - ran
                if ran < epochs:
                    stopped_runs += 1
                    lost += run is best
                else:
                    kept.append(run)
            rung = stopping.rungs(epochs)[0]
            if len(kept) >= 3:
                rho = rank_agreement(
                    [k.curve[rung - 1] for k in kept], [k.val_accuracy for k in kept]
                )
                survivors_rho.append(rho.estimate)
        rho_text = (
            f"rho at epoch {rung} among those that ran on {statistics.mean(survivors_rho):+.2f}"
            if survivors_rho
            else "too few ran on for a rho"
        )
        print(
            f"  {name:<24} stopped {stopped_runs}/{len(replays) * len(ALL)} trials, saved "
            f"{100 * saved / total:.0f} % of epochs, stopped the eventual best in "
            f"{lost}/{len(replays)} searches; {rho_text}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    table, replays, longer = prepare(args)
    print(
        f"\nranking reliability: {args.searches} searches replayed over real runs; "
        f"exploration {args.explore_epochs} epochs, confirmation {args.confirm_epochs} epochs "
        f"(race: min 2, max 5 seeds, alpha 0.05)\n{table.setting.describe()}\n{machine()}"
    )
    noise(table, replays, args)
    aa(table, args)
    repeatability(replays)
    cost(replays)
    for group in longer.values():
        cost(group)
    rungs(table, replays, args)


if __name__ == "__main__":
    main()
