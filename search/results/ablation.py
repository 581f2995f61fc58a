"""The paper's ablation tables from a search's trials.

Ablation tables group the completed CBAM trials by one knob at a time, as the paper's tables
do. The references *no attention* and *SE* are not CBAM: they are left out of the groups and
listed apart, as ``baselines`` (with the paper's CBAM reference, which also counts in the groups
like any other CBAM trial).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from search.knobs import ARRANGEMENTS, BLOCK_CHOICES, POOL_TYPES, SPATIAL_POOLS
from search.results.cache import cached
from search.results.rows import Row, architectures, check_overhead, load_rows
from search.space import REFERENCE_NAMES, Architecture, encode_choice
from search.stats import ACCURACY_RANGE, mean_interval
from search.store.models import Phase, TrialResult

if TYPE_CHECKING:
    from search.store.engine import Database


def _placement(arch: Architecture) -> str:
    where = "all" if arch.stages is None else "s" + encode_choice(arch.stages)
    return where if arch.blocks == "all" else f"{where}/{arch.blocks}"


def _placement_order(arch: Architecture) -> tuple[Any, ...]:
    stages = arch.stages or arch.info.stages
    return (len(stages), stages, BLOCK_CHOICES.index(arch.blocks))


def _pool_order(pools: tuple[str, ...]) -> tuple[Any, ...]:
    return (len(pools), tuple(POOL_TYPES.index(p) for p in pools))


# knob -> (title, value of a CBAM architecture (None: not applicable), sort key of that value
# given the architecture)
_ABLATIONS: dict[str, tuple[str, Callable[[Architecture], Any], Callable[[Architecture], Any]]] = {
    "arrangement": (
        "Arrangement",
        lambda a: a.arrangement,
        lambda a: ARRANGEMENTS.index(a.arrangement),
    ),
    "pool_types": (
        "Channel pooling",
        lambda a: encode_choice(a.pool_types) if a.pool_types else None,
        lambda a: _pool_order(a.pool_types),
    ),
    "kernel_size": ("Spatial kernel size", lambda a: a.kernel_size, lambda a: a.kernel_size),
    "spatial_pool": (
        "Spatial pooling",
        lambda a: a.spatial_pool,
        lambda a: SPATIAL_POOLS.index(a.spatial_pool),
    ),
    "reduction": ("Reduction ratio", lambda a: a.reduction, lambda a: a.reduction),
    "placement": ("Placement", _placement, _placement_order),
}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _stats(accuracies: list[float], pcts: list[float]) -> dict[str, Any]:
    accuracy_mean, accuracy_std = _mean_std(accuracies)
    pct_mean, pct_std = _mean_std(pcts)
    return {
        "n": len(accuracies),
        "accuracy_mean": accuracy_mean,
        "accuracy_std": accuracy_std,
        "accuracy_ci95": mean_interval(accuracies, within=ACCURACY_RANGE).bounds
        if accuracies
        else None,
        "accuracy_max": max(accuracies) if accuracies else None,
        "overhead_pct_mean": pct_mean,
        "overhead_pct_std": pct_std,
    }


def ablation(db: Database, search_id: str, overhead: str = "params") -> dict[str, Any]:
    """The paper's ablation tables from this search's completed trials.

    One table per knob (``arrangement``, ``pool_types``, ``kernel_size``, ``spatial_pool``,
    ``reduction``, ``placement``), one row per value with ``n``, the mean (with Student's t
    interval over the group's trials: it mixes the group's architectures with their noise),
    sample standard deviation and maximum of the validation accuracy (a fraction) and the mean
    and standard
    deviation of the overhead in percent over no attention (``overhead``'s ``*_pct`` column;
    rows without it count in ``n`` but not in those). Only CBAM trials are grouped, and only
    those whose arrangement has the knob (no kernel size for channel-only); ``left_out`` counts
    the others. Rows follow the knob's natural order: arrangements as ``ARRANGEMENTS`` lists
    them, single pools before pairs, numbers ascending, placements from the fewest stages to
    all of them (every block, then the first, then the last). Values are as ``Architecture``
    holds them, pool types joined with ``+``, placement as ``all``, ``s1+2``, ``s3/last``...
    ``baselines`` gives the same figures for each reference (no attention, SE, the paper's
    CBAM) the search has completed. The exploration's trials only: one schedule and one seed,
    where the confirmation's runs would count an architecture once per seed."""
    _, pct_column = check_overhead(overhead)

    def compute() -> dict[str, Any]:
        rows = load_rows(
            db,
            search_id,
            TrialResult.val_accuracy,
            getattr(TrialResult, pct_column).label("pct"),
            TrialResult.reference,
            TrialResult.id,
            TrialResult.phase,
        )
        rows = [row for row in rows if row["phase"] == Phase.explore]
        archs = architectures(db, search_id, [row["id"] for row in rows])
        cbam: list[tuple[Architecture, Row]] = []
        for row in rows:
            arch = archs.get(row["id"])
            if arch is not None and arch.attention == "cbam":
                cbam.append((arch, row))
        tables = []
        for knob, (title, value_of, order_of) in _ABLATIONS.items():
            groups: dict[Any, tuple[Any, list[float], list[float]]] = {}
            for arch, row in cbam:
                value = value_of(arch)
                if value is None:
                    continue
                _, accuracies, pcts = groups.setdefault(value, (order_of(arch), [], []))
                accuracies.append(row["val_accuracy"])
                if row["pct"] is not None:
                    pcts.append(row["pct"])
            table_rows = [
                {"value": value, **_stats(accuracies, pcts)}
                for value, (_, accuracies, pcts) in sorted(
                    groups.items(), key=lambda item: item[1][0]
                )
            ]
            grouped = sum(r["n"] for r in table_rows)
            tables.append(
                {
                    "knob": knob,
                    "title": title,
                    "trials": grouped,
                    "left_out": len(rows) - grouped,
                    "rows": table_rows,
                }
            )
        baselines = []
        for name in REFERENCE_NAMES:
            mine = [row for row in rows if row["reference"] == name]
            if mine:
                baselines.append(
                    {
                        "value": name,
                        **_stats(
                            [r["val_accuracy"] for r in mine],
                            [r["pct"] for r in mine if r["pct"] is not None],
                        ),
                    }
                )
        return {
            "search_id": search_id,
            "overhead": overhead,
            "pct_column": pct_column,
            "trials": len(rows),
            "cbam_trials": len(cbam),
            "baselines": baselines,
            "tables": tables,
        }

    return cached(db, search_id, ("ablation", overhead), compute)
