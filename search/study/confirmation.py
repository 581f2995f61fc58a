"""Confirmation by racing: which architectures run again, on which seeds, and when an arm stops.

After the exploration, the *arms* are the three references (no attention, SE, the paper's CBAM)
and up to ``confirm.top_k`` candidates: the explored architectures on the Pareto front of
accuracy against the search's overheads (multi-objective mode), or the most accurate ones (the
constrained mode, where every completed trial is within the overhead budget), best first.

Round ``r`` runs every arm still in the race on seed :func:`confirm_seed` ``(spec, r)``, the
same seed for all of them: a paired design, whose per-seed differences cancel what a seed does to
every arm. Once ``confirm.min_seeds`` rounds are complete, every pair of arms is compared on the
seeds both ran (paired t), the p-values corrected for the race's looks (one per round from
``min_seeds`` to ``max_seeds``, :func:`search.stats.look_share`: stopping at the first
significant look would otherwise inflate false verdicts), then Holm-corrected across all the
pairs; an arm significantly worse than another stops. (Each arm against the best alone would
choose its reference by luck: with six identical arms that stopped one 8 % of the time.) Arms
still tied run on until ``confirm.max_seeds`` seeds, or until one is left, or until the next
round would pass ``confirm.trials`` runs. An arm whose run failed (out of retries) stops too:
its mean would be missing a seed the others have.

Everything here is a pure function of the rows: the race is replayed from the recorded results
(:func:`race`), so any worker can tell what comes next and no state is kept besides the rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from search.pareto import pareto_flags
from search.space import REFERENCE_NAMES, Architecture, reference_architectures
from search.spec import ConfirmSpec, SearchSpec
from search.stats import paired_difference, worse_than_another

FAILED = "failed"
"""A run that ended without an accuracy (as a result in :func:`race`)."""


@dataclass(frozen=True)
class Arm:
    """One architecture in the race; ``reference`` names a reference arm."""

    architecture: Architecture
    reference: str | None = None

    @property
    def arch_id(self) -> str:
        return self.architecture.id


def confirm_seed(spec: SearchSpec, round_: int) -> int:
    """The training seed of confirmation round ``round_`` (exploration trains on ``spec.seed``)."""
    return (spec.seed + 1 + round_) % 2**32


def arms(spec: SearchSpec, explored: Sequence[Mapping[str, Any]]) -> list[Arm]:
    """The references, then the candidates best first. ``explored``: the exploration's completed
    rows with ``architecture``, ``arch_id``, ``reference``, ``val_accuracy`` and the overheads'
    absolute figures. An explored architecture equal to a reference counts as that reference."""
    references = reference_architectures(spec.backbone)
    out = [Arm(references[name], name) for name in REFERENCE_NAMES]
    taken = {arm.arch_id for arm in out}
    best: dict[str, Mapping[str, Any]] = {}
    for row in explored:
        if row.get("val_accuracy") is None or row["arch_id"] in taken:
            continue
        if row["arch_id"] not in best or row["val_accuracy"] > best[row["arch_id"]]["val_accuracy"]:
            best[row["arch_id"]] = row
    rows = sorted(best.values(), key=lambda r: (-r["val_accuracy"], r["arch_id"]))
    if not spec.objectives.constrained:
        flags = pareto_flags(rows, spec.objectives.overheads)
        rows = [row for row, on_front in zip(rows, flags, strict=True) if on_front]
    for row in rows[: spec.confirm.top_k]:
        out.append(Arm(Architecture.from_dict(row["architecture"])))
    return out


@dataclass
class Race:
    """Where the race stands: ``round`` is the round to run or being run (``len(seeds)`` rounds
    are complete before it), ``active`` the arms still racing (indices into the arm list),
    ``stopped`` arm index -> the round after which it stopped, ``scheduled`` whether round
    ``round`` has rows yet, and ``finished`` whether no round follows."""

    round: int = 0
    active: list[int] = field(default_factory=list)
    stopped: dict[int, int] = field(default_factory=dict)
    scheduled: bool = False
    finished: bool = False


def race(
    spec: SearchSpec,
    n_arms: int,
    results: Mapping[tuple[int, int], float | str | None],
    runs_so_far: int = 0,
) -> Race:
    """Replay the race from ``results``: (arm index, round) -> the run's accuracy,
    :data:`FAILED`, or None while it runs (a key absent: not scheduled). ``runs_so_far`` counts
    the confirmation runs already scheduled (against ``confirm.trials``)."""
    confirm = spec.confirm
    state = Race(active=list(range(n_arms)))
    for round_ in range(confirm.max_seeds):
        state.round = round_
        present = [(arm, round_) in results for arm in state.active]
        state.scheduled = any(present)
        if not state.scheduled:
            state.finished = runs_so_far + len(state.active) > spec.confirm_trials
            return state
        if any(results.get((arm, round_)) is None for arm in state.active):
            return state  # the round is still running
        for arm in list(state.active):
            if results[(arm, round_)] == FAILED:
                state.active.remove(arm)
                state.stopped[arm] = round_
        if round_ + 1 >= confirm.min_seeds:
            for arm in _significantly_worse(state.active, results, round_ + 1, confirm):
                state.active.remove(arm)
                state.stopped[arm] = round_
        if len(state.active) <= 1:
            break
    state.round += 1
    state.scheduled = False
    state.finished = True
    return state


def _significantly_worse(
    active: Sequence[int],
    results: Mapping[tuple[int, int], float | str | None],
    rounds: int,
    confirm: ConfirmSpec,
) -> list[int]:
    """The active arms significantly worse than another active arm over ``rounds`` seeds: every
    pair paired on its seeds, corrected for the race's looks, Holm across all the pairs
    (:func:`search.stats.worse_than_another`)."""
    scores = {arm: [float(results[(arm, r)]) for r in range(rounds)] for arm in active}
    pairs = [
        (a, b, paired_difference(scores[a], scores[b]))
        for a, b in itertools.combinations(active, 2)
    ]
    worse = worse_than_another(pairs, confirm.alpha, confirm.looks)
    return [arm for arm in active if arm in worse]
