"""The Pareto front of validation accuracy against overheads, over rows as they are (pure).

Within one search every trial shares a backbone, so the absolute overheads (``params``,
``macs``, ``latency_ms``) order trials exactly as their percentages over the no-attention
baseline do; the front uses the absolute figures. A missing figure is worse than any value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ACCURACY = "val_accuracy"
# overhead name (as in SearchSpec.objectives) -> (absolute column, percent column)
OVERHEAD_COLUMNS = {
    "params": ("params", "params_pct"),
    "macs": ("macs", "macs_pct"),
    "latency": ("latency_ms", "latency_pct"),
}


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], overheads: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` everywhere (higher accuracy, lower overheads)
    and better somewhere. A missing figure is worse than any value."""
    pairs = list(zip(_goodness(a, overheads), _goodness(b, overheads), strict=True))
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def _goodness(entry: Mapping[str, Any], overheads: Sequence[str]) -> tuple[float, ...]:
    """Accuracy and negated overheads: higher is better in every position."""
    inf = float("inf")
    accuracy = entry.get(ACCURACY)
    figures = [entry.get(OVERHEAD_COLUMNS[o][0]) for o in overheads]
    return (
        -inf if accuracy is None else float(accuracy),
        *(-inf if figure is None else -float(figure) for figure in figures),
    )


def pareto_flags(entries: Sequence[Mapping[str, Any]], overheads: Sequence[str]) -> list[bool]:
    """For each entry, whether no other entry dominates it.

    Entries are visited best first (lexicographically by :func:`_goodness`), so a dominator is
    always visited before what it dominates and only the front found so far has to be checked:
    O(n log n) for one overhead (a staircase: the lowest overhead seen so far), O(n * front)
    with more. Optuna's ``_is_pareto_front`` needs every objective finite and a numpy array per
    call; this takes rows as they are, missing figures included.
    """
    goodness = [_goodness(entry, overheads) for entry in entries]
    order = sorted(range(len(entries)), key=lambda i: goodness[i], reverse=True)
    flags = [False] * len(entries)
    if len(overheads) == 1:
        best: tuple[float, ...] | None = None  # the visited point with the lowest overhead
        for i in order:
            point = goodness[i]
            # Visited points have accuracy >= this one's; one dominates iff its overhead is
            # lower, or equal with a higher accuracy.
            if best is None or best[1] < point[1] or (best[1] == point[1] and best == point):
                flags[i] = True
            if best is None or point[1] > best[1]:
                best = point
        return flags
    front: list[tuple[float, ...]] = []
    for i in order:
        point = goodness[i]
        if not any(_better_or_equal_and_better(f, point) for f in front):
            flags[i] = True
            front.append(point)
    return flags


def _better_or_equal_and_better(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and a != b
