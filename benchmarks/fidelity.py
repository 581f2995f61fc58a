"""Does a short exploration predict what a longer confirmation finds, and what do both cost?

The searches of ``benchmarks.ranking_reliability`` (exploration at ``--explore-epochs`` on the
spec's seed, racing at ``--confirm-epochs`` on shared seeds; real runs replayed through the
product's code, ``benchmarks/_runs.py``), and a full board beside them: every architecture on
every confirmation seed at the longer schedule (no racing), the best estimate this table has of
the truth. Printed:

- each architecture's mean accuracy at both schedules (what a short schedule does to the order);
- how often the exploration's winner lands in the race's top group, and in the full board's;
  and how often its best CBAM variant is in the top group of the variants alone (on the full
  board), where the differences are fractions of a point;
- Spearman's rho between one exploration run per architecture and its mean at the longer
  schedule (over the 7 architectures, per search), beside the same for one run at the longer
  schedule (leave-one-out mean): whether the disagreement comes from the short schedule or from
  having one seed; and the product's own ``rank_agreement`` (over the raced arms only);
- the epochs of both phases.

    python -m benchmarks.fidelity [--searches 8] [--explore-epochs 3] [--confirm-epochs 8]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from benchmarks._runs import ALL, Replay, RunTable, board_row, confirm_seeds
from benchmarks._timing import machine
from benchmarks.ranking_reliability import parse, prepare, share
from search.results.leaderboard import confirmed_board
from search.space import Architecture
from search.stats import mean_interval, rank_agreement


def _interval(values: Sequence[float]) -> str:
    m = mean_interval(values)
    low, high = m.bounds or (float("nan"), float("nan"))
    low, high = max(low, -1.0), min(high, 1.0)  # clip a t interval to rho
    return f"{m.estimate:+.2f} [{low:+.2f}, {high:+.2f}]"


def full_board(
    table: RunTable, archs: Sequence[Architecture], seeds: Sequence[int], epochs: int
) -> list[str]:
    """The top group of ``archs``, each on every seed (fixed seeds: no look correction)."""
    rows = [
        board_row(table.get(a, s, epochs), a, table.setting.val_images)
        for a in archs
        for s in seeds
    ]
    return confirmed_board(rows, "params").top_group


def orders(table: RunTable, replays: Sequence[Replay], args: argparse.Namespace) -> None:
    explore = [r.spec.seed for r in replays]
    seeds = sorted({s for r in replays for s in confirm_seeds(r.spec)})
    print("\nmean validation accuracy (%) over seeds")
    short_head, long_head = f"{args.explore_epochs} epochs", f"{args.confirm_epochs} epochs"
    print(f"  {'architecture':<32}{short_head:>12}{long_head:>12}")
    for arch in ALL:
        short = statistics.mean(table.scores(arch, explore, args.explore_epochs))
        long = statistics.mean(table.scores(arch, seeds, args.confirm_epochs))
        print(f"  {arch.describe():<32}{100 * short:>12.1f}{100 * long:>12.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    table, replays, _ = prepare(args)
    seeds = sorted({s for r in replays for s in confirm_seeds(r.spec)})
    print(
        f"\nfidelity: exploration {args.explore_epochs} epochs (one seed), confirmation "
        f"{args.confirm_epochs} epochs (racing); {len(replays)} searches\n"
        f"{table.setting.describe()}\n{machine()}"
    )
    orders(table, replays, args)
    n = len(replays)
    truth = full_board(table, ALL, seeds, args.confirm_epochs)
    variants = [a for a in ALL if a.attention == "cbam"]
    among_variants = full_board(table, variants, seeds, args.confirm_epochs)
    in_race = sum(r.winner.arch_id in r.board.top_group for r in replays)
    in_full = sum(r.winner.arch_id in truth for r in replays)
    variant_in = sum(r.best_variant.arch_id in among_variants for r in replays)
    print(f"\nexploration's winner in the race's top group:      {share(in_race, n)}")
    print(
        f"exploration's winner in the full board's top group: {share(in_full, n)} "
        f"(every architecture on {len(seeds)} seeds)"
    )
    print(
        f"exploration's best CBAM variant in the top group of the CBAM variants' full board: "
        f"{share(variant_in, n)} ({len(among_variants)} of {len(variants)} variants in it)"
    )
    short_rho, long_rho, product_rho = [], [], []
    for r in replays:
        means = [statistics.mean(table.scores(a, seeds, args.confirm_epochs)) for a in ALL]
        short = [table.get(a, r.spec.seed, args.explore_epochs).val_accuracy for a in ALL]
        short_rho.append(rank_agreement(short, means).estimate)
        one = confirm_seeds(r.spec)[0]
        rest = [s for s in seeds if s != one]
        loo = [statistics.mean(table.scores(a, rest, args.confirm_epochs)) for a in ALL]
        single = [table.get(a, one, args.confirm_epochs).val_accuracy for a in ALL]
        long_rho.append(rank_agreement(single, loo).estimate)
        confirmed = {e["arch_id"]: e["val_accuracy_mean"] for e in r.board.entries}
        explored = {run.arch_id: run.val_accuracy for run in r.explored}
        raced = sorted(confirmed)
        rho = rank_agreement([explored[a] for a in raced], [confirmed[a] for a in raced])
        product_rho.append(rho.estimate)
    print(
        "\nSpearman's rho against the mean at the longer schedule (mean over searches, t 95 % CI)"
    )
    print(f"  one run at {args.explore_epochs} epochs (the exploration): {_interval(short_rho)}")
    print(f"  one run at {args.confirm_epochs} epochs:                   {_interval(long_rho)}")
    print(f"  the product's rank_agreement (raced arms only): {_interval(product_rho)}")
    explore_epochs = [len(r.explored) * args.explore_epochs for r in replays]
    confirm = [r.confirm_epochs for r in replays]
    print(
        f"\ncost per search: exploration {statistics.mean(explore_epochs):.0f} epochs, "
        f"confirmation {statistics.mean(confirm):.0f} epochs "
        f"({min(confirm)}-{max(confirm)}); every arm on every seed would be "
        f"{statistics.mean(r.naive_epochs for r in replays):.0f}"
    )


if __name__ == "__main__":
    main()
