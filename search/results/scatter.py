"""The Pareto scatter of accuracy against an overhead, thinned for drawing.

Large searches are thinned (:func:`thin`; also for the knobs' parallel coordinates): every Pareto
point and every reference is kept, and of the rest only the best trial (highest accuracy, then
lowest overhead, then lowest number) of each cell of a grid over accuracy x overhead, with the
finest grid that keeps the answer within ``max_points``. The answer says how many points there
were (``total``) and how many it holds (``shown``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from search.results.cache import cached
from search.results.queries import ranking
from search.results.rows import check_overhead, check_positive, point_details

if TYPE_CHECKING:
    from search.store.engine import Database

DEFAULT_MAX_POINTS = 2000


def thin(
    accuracy: Sequence[float],
    overhead: Sequence[float],
    number: Sequence[int],
    keep: Sequence[bool],
    max_points: int,
) -> list[int]:
    """The indices to draw, ascending: all of them when there are at most ``max_points``;
    else every index with ``keep`` set and the best point of each cell of the finest square
    grid over accuracy x overhead that keeps the answer within ``max_points`` (more only when
    ``keep`` alone exceeds it). Best: highest accuracy, then lowest overhead, then lowest
    number. Deterministic: the same points give the same answer."""
    n = len(accuracy)
    if n <= max_points:
        return list(range(n))
    acc = np.asarray(accuracy, dtype=float)
    cost = np.asarray(overhead, dtype=float)
    forced = np.asarray(keep, dtype=bool)
    order = np.lexsort((np.asarray(number), cost, -acc))  # best first

    def scaled(values: np.ndarray) -> np.ndarray:
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)

    unit_acc, unit_cost = scaled(acc)[order], scaled(cost)[order]
    forced_sorted = forced[order]

    def chosen(grid: int) -> np.ndarray:
        rows = np.minimum((unit_acc * grid).astype(np.int64), grid - 1)
        cols = np.minimum((unit_cost * grid).astype(np.int64), grid - 1)
        _, first = np.unique(rows * grid + cols, return_index=True)
        picked = np.zeros(n, dtype=bool)
        picked[first] = True
        return picked | forced_sorted

    # The number of occupied cells grows (about monotonically) with the grid: bisect on it.
    low, high = 1, max(1, max_points)
    best = chosen(1)
    while low <= high:
        grid = (low + high) // 2
        picked = chosen(grid)
        if picked.sum() <= max_points:
            best, low = picked, grid + 1
        else:
            high = grid - 1
    return sorted(int(i) for i in order[best])


# -- scatter -----------------------------------------------------------------------------------


def scatter(
    db: Database, search_id: str, overhead: str = "params", max_points: int = DEFAULT_MAX_POINTS
) -> dict[str, Any]:
    """Every completed trial as a point of accuracy against ``overhead`` (thinned above
    ``max_points``, see the module), sorted by overhead. Trials without that overhead figure
    cannot be drawn: they are counted in ``missing`` and take no part in the Pareto front."""
    column, pct_column = check_overhead(overhead)
    check_positive("max_points", max_points)

    def compute() -> dict[str, Any]:
        # The ranking (cached, shared with the leaderboard) already holds the Pareto flags.
        entries = ranking(db, search_id, overhead).entries
        drawn = [entry for entry in entries if entry[column] is not None]
        shown = thin(
            [entry["val_accuracy"] for entry in drawn],
            [entry[column] for entry in drawn],
            [entry["number"] for entry in drawn],
            [entry["pareto"] or entry["reference"] is not None for entry in drawn],
            max_points,
        )
        details = point_details(db, search_id, [drawn[i]["id"] for i in shown])
        points = []
        for i in shown:
            entry, detail = drawn[i], details[drawn[i]["id"]]
            points.append(
                {
                    "number": entry["number"],
                    "val_accuracy": entry["val_accuracy"],
                    "overhead": entry[column],
                    "overhead_pct": detail[pct_column],
                    "pareto": entry["pareto"],
                    "reference": entry["reference"],
                    "label": detail["label"],
                }
            )
        points.sort(key=lambda p: (p["overhead"], -p["val_accuracy"], p["number"]))
        return {
            "search_id": search_id,
            "overhead": overhead,
            "column": column,
            "pct_column": pct_column,
            "total": len(drawn),
            "shown": len(points),
            "downsampled": len(points) < len(drawn),
            "missing": len(entries) - len(drawn),
            "pareto": sum(entry["pareto"] for entry in drawn),
            "points": points,
        }

    return cached(db, search_id, ("scatter", overhead, max_points), compute)
