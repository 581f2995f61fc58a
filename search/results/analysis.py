"""What the dashboard's search page draws, computed from a search's trials: the Pareto scatter,
parallel coordinates of the knobs, the paper's ablation tables, learning curves of the best
trials and knob importances.

Everything but :func:`importance` reads our own indexed ``trial_results`` rows (completed rows
with a validation accuracy); :func:`importance` reads the Optuna study. Results are cached in
the process, keyed by the search and its *version*: the number of completed rows and the
latest ``finished_at`` among them (one indexed query). A new completed trial changes the
version, so a cached answer is never stale for longer than that query takes to notice; a
dashboard polling an unchanged search costs one small query per call. Cached answers are shared
between callers: treat them as read-only.

Large searches are thinned for drawing (:func:`scatter`, :func:`knobs`): every Pareto point
and every reference is kept, and of the rest only the best trial (highest accuracy, then lowest
overhead, then lowest number) of each cell of a grid over accuracy x overhead, with the finest
grid that keeps the answer within ``max_points``. The answer says how many points there were
(``total``) and how many it holds (``shown``).

Ablation tables group the completed CBAM trials by one knob at a time, as the paper's tables
do. The references *no attention* and *SE* are not CBAM: they are left out of the groups and
listed apart, as ``baselines`` (with the paper's CBAM reference, which also counts in the groups
like any other CBAM trial).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import warnings
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import optuna
import optuna.importance  # at import (about 1 s, scikit-learn): not at the first request
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from search.errors import InvalidValue, NotFound
from search.knobs import ARRANGEMENTS, POOL_TYPES, SPATIAL_POOLS, has_channel_gate, has_spatial_gate
from search.results.cache import CACHE, Cache, cached, completed, version
from search.results.leaderboard import OVERHEAD_COLUMNS, pareto_flags
from search.results.queries import ranking
from search.space import BLOCK_CHOICES, REFERENCE_NAMES, Architecture
from search.spec import SearchSpec
from search.store.models import Search, TrialResult

if TYPE_CHECKING:
    from search.store.engine import Database

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 2000
# Trials sampled for the knob paths: parcats draws ~100 ms per 1,000 distinct paths.
DEFAULT_PATH_TRIALS = 1000
# Fewer completed trials (with knob values) than this: no importances.
MIN_IMPORTANCE_TRIALS = 3
IMPORTANCE_EVALUATOR = "PedAnovaImportanceEvaluator"
CURVE_KEYS = ("val_accuracy", "train_loss", "val_loss", "train_accuracy")

Row = dict[str, Any]


# -- caching -----------------------------------------------------------------------------------


def clear_cache() -> None:
    """Forget every cached answer (tests; a process that rewrites rows in place)."""
    CACHE.clear()
    _ARCHITECTURES.searches.clear()
    _POINT_DETAILS.searches.clear()
    _STUDY_TRIALS.clear()


def _check_overhead(overhead: str) -> tuple[str, str]:
    if overhead not in OVERHEAD_COLUMNS:
        raise InvalidValue("overhead", overhead, list(OVERHEAD_COLUMNS))
    return OVERHEAD_COLUMNS[overhead]


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(name, value, "an integer >= 1")
    return value


# -- loading -----------------------------------------------------------------------------------


def _load(db: Database, search_id: str, *columns: Any) -> list[Row]:
    """The completed rows of the search as dicts of ``columns``; references as strings."""
    with db.session() as session:
        result = session.execute(select(*columns).where(*completed(search_id)))
        keys = list(result.keys())
        rows = [dict(zip(keys, values, strict=True)) for values in result.all()]
    for row in rows:
        if "reference" in row:
            row["reference"] = row["reference"].value if row["reference"] else None
    return rows


def _parse(data: Mapping[str, Any] | None) -> Architecture | None:
    try:
        return Architecture.from_dict(data or {})
    except (InvalidValue, TypeError):
        return None


_IN_CHUNK = 500


def _by_id(db: Database, search_id: str, ids: Sequence[int], *columns: Any) -> dict[int, Row]:
    """Row id -> ``columns`` of those completed rows of the search: in chunks of ids, or in
    one pass over the search when they are most of it."""
    query = select(TrialResult.id.label("id"), *columns)
    with db.engine.connect() as connection:
        if len(ids) > 2 * _IN_CHUNK:
            chunks = [connection.execute(query.where(*completed(search_id)))]
        else:
            chunks = [
                connection.execute(query.where(TrialResult.id.in_(ids[start : start + _IN_CHUNK])))
                for start in range(0, len(ids), _IN_CHUNK)
            ]
        keys = ["id", *(column.key for column in columns)]
        return {
            row[0]: dict(zip(keys, row, strict=True)) for chunk in chunks for row in chunk.all()
        }


class _RowFacts:
    """What a completed row holds and never changes (its architecture, label, overhead
    percentages), read once per process: a search's answers after a new trial read that
    trial's row only. Kept per (database, search), for the last few searches."""

    def __init__(self, read: Callable[[Row], Any], *columns: Any) -> None:
        self.read = read
        self.columns = columns
        self.searches = Cache(maxsize=8)  # about 10 MB per 10,000 rows

    def get(self, db: Database, search_id: str, ids: Sequence[int]) -> dict[int, Any]:
        """Row id -> fact, for every id of ``ids`` (rows of the search)."""
        known: dict[int, Any] = self.searches.get_or_compute((repr(db), search_id), dict)
        missing = [i for i in ids if i not in known]
        if missing:
            for row_id, row in _by_id(db, search_id, missing, *self.columns).items():
                known.setdefault(row_id, self.read(row))
        return {i: known[i] for i in ids if i in known}


_ARCHITECTURES = _RowFacts(lambda row: _parse(row["architecture"]), TrialResult.architecture)
_POINT_DETAILS = _RowFacts(
    dict,
    TrialResult.label,
    *(getattr(TrialResult, pct) for _, pct in OVERHEAD_COLUMNS.values()),
)


def _architectures(db: Database, search_id: str, ids: Sequence[int]) -> dict[int, Any]:
    """Row id -> Architecture (None where unreadable) for every id of ``ids``."""
    return _ARCHITECTURES.get(db, search_id, ids)


# -- thinning ----------------------------------------------------------------------------------


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
    column, pct_column = _check_overhead(overhead)
    _check_positive("max_points", max_points)

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
        details = _POINT_DETAILS.get(db, search_id, [drawn[i]["id"] for i in shown])
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


# -- knobs (parallel coordinates) --------------------------------------------------------------


def _encode(values: Iterable[Any]) -> str:
    return "+".join(str(v) for v in values)


def _stages(arch: Architecture) -> str | None:
    if arch.attention == "none":
        return None
    return _encode(arch.stages or arch.info.stages)


# knob -> (kind, value of an architecture (None where it does not apply))
_KNOBS: dict[str, tuple[str, Callable[[Architecture], Any]]] = {
    "arrangement": ("categorical", lambda a: a.arrangement),
    "reduction": ("numeric", lambda a: a.reduction),
    "pool_types": ("categorical", lambda a: _encode(a.pool_types) if a.pool_types else None),
    "mlp_bias": ("categorical", lambda a: a.mlp_bias),
    "kernel_size": ("numeric", lambda a: a.kernel_size),
    "spatial_pool": ("categorical", lambda a: a.spatial_pool),
    "spatial_bn": ("categorical", lambda a: a.spatial_bn),
    "stages": ("categorical", _stages),
    "blocks": ("categorical", lambda a: None if a.attention == "none" else a.blocks),
}


def _space_values(spec: SearchSpec) -> dict[str, list[Any]]:
    """Knob -> the values the search's space allows, for the knobs that can vary in it (a knob
    of a gate that no allowed arrangement has cannot)."""
    space = spec.space
    channel = any(has_channel_gate(a) for a in space.arrangements)
    spatial = any(has_spatial_gate(a) for a in space.arrangements)
    values: dict[str, list[Any]] = {"arrangement": list(space.arrangements)}
    if channel:
        values["reduction"] = sorted(space.reductions)
        values["pool_types"] = [_encode(p) for p in space.pool_types]
        values["mlp_bias"] = list(space.mlp_bias)
    if spatial:
        values["kernel_size"] = sorted(space.kernel_sizes)
        values["spatial_pool"] = list(space.spatial_pools)
        values["spatial_bn"] = list(space.spatial_bn)
    values["stages"] = [_encode(s) for s in space.stage_choices(spec.backbone)]
    values["blocks"] = list(space.blocks)
    return {name: allowed for name, allowed in values.items() if len(allowed) > 1}


def _spec(db: Database, search_id: str) -> SearchSpec:
    with db.session() as session:
        data = session.scalar(select(Search.spec).where(Search.id == search_id))
    if data is None:
        raise NotFound(f"search {search_id}")
    return SearchSpec.from_dict(data)


def knobs(
    db: Database,
    search_id: str,
    overhead: str = "params",
    max_points: int = DEFAULT_MAX_POINTS,
) -> dict[str, Any]:
    """Parallel coordinates: ``columns`` (the knobs the space lets vary, then the objectives
    ``val_accuracy`` and ``overhead_pct``) and one row per completed trial with the knob values
    (None where a knob does not apply), thinned like :func:`scatter` on accuracy x
    ``overhead``. Categorical columns list their ``values`` in the space's order (plus any
    other value a reference has); numeric ones give their ``range``."""
    column, pct_column = _check_overhead(overhead)
    _check_positive("max_points", max_points)

    def compute() -> dict[str, Any]:
        allowed = _space_values(_spec(db, search_id))
        rows = _load(
            db,
            search_id,
            TrialResult.number,
            TrialResult.val_accuracy,
            getattr(TrialResult, column).label("cost"),
            getattr(TrialResult, pct_column).label("overhead_pct"),
            TrialResult.reference,
            TrialResult.label,
            TrialResult.id,
        )
        flags = pareto_flags(
            [{"val_accuracy": r["val_accuracy"], column: r["cost"]} for r in rows], [overhead]
        )
        shown = thin(
            [row["val_accuracy"] for row in rows],
            _finite([row["cost"] for row in rows]),
            [row["number"] for row in rows],
            [f or r["reference"] is not None for r, f in zip(rows, flags, strict=True)],
            max_points,
        )
        architectures = _architectures(db, search_id, [rows[i]["id"] for i in shown])
        out_rows = []
        for i in shown:
            row = rows[i]
            arch = architectures.get(row["id"])
            entry = {
                "number": row["number"],
                "reference": row["reference"],
                "label": row["label"],
                "val_accuracy": row["val_accuracy"],
                "overhead_pct": row["overhead_pct"],
            }
            for name in allowed:
                entry[name] = None if arch is None else _KNOBS[name][1](arch)
            out_rows.append(entry)
        out_rows.sort(key=lambda r: r["number"])
        columns = [_column(name, allowed[name], out_rows) for name in allowed]
        columns.append(_numeric_column("val_accuracy", out_rows, role="objective"))
        columns.append(_numeric_column("overhead_pct", out_rows, role="objective"))
        return {
            "search_id": search_id,
            "overhead": overhead,
            "total": len(rows),
            "shown": len(out_rows),
            "downsampled": len(out_rows) < len(rows),
            "columns": columns,
            "rows": out_rows,
        }

    return cached(db, search_id, ("knobs", overhead, max_points), compute)


# Accuracy bands of :func:`knob_paths`: (share of the trials, by rank of accuracy, name).
ACCURACY_BANDS = ((0.10, "top 10%"), (0.25, "10-25%"), (0.50, "25-50%"), (1.0, "bottom 50%"))
NOT_APPLICABLE = "n/a"


def knob_paths(
    db: Database, search_id: str, max_trials: int = DEFAULT_PATH_TRIALS
) -> dict[str, Any]:
    """Parallel categories of the knobs against accuracy.

    Every completed trial falls in one of :data:`ACCURACY_BANDS` by rank of validation
    accuracy. Trials with the same knob values (``"n/a"`` where a knob does not apply) in the
    same band form one path, with their ``count`` and mean accuracy. Above ``max_trials``
    trials, the paths are drawn from a uniform random sample of that many (seeded), so that
    counts keep their proportions (the bands still come from every trial). ``columns`` are the
    knobs of :func:`knobs` with their values as strings; ``bands`` each band with its count and
    accuracy range over all trials (a band may be empty when there are few); a path's ``band``
    indexes them."""
    _check_positive("max_trials", max_trials)

    def compute() -> dict[str, Any]:
        allowed = _space_values(_spec(db, search_id))
        rows = _load(db, search_id, TrialResult.id, TrialResult.number, TrialResult.val_accuracy)
        rows.sort(key=lambda r: (-r["val_accuracy"], r["number"]))
        ends = [math.ceil(share * len(rows)) for share, _ in ACCURACY_BANDS]
        bands = [{"name": name, "count": 0, "min": None, "max": None} for _, name in ACCURACY_BANDS]
        band = 0
        for rank, row in enumerate(rows):
            while rank >= ends[band]:
                band += 1
            row["band"] = band
            summary = bands[band]
            summary["count"] += 1
            summary["max"] = row["val_accuracy"] if summary["max"] is None else summary["max"]
            summary["min"] = row["val_accuracy"]
        sample = rows
        if len(rows) > max_trials:
            picked = sorted(random.Random(0).sample(range(len(rows)), max_trials))
            sample = [rows[i] for i in picked]
        architectures = _architectures(db, search_id, [row["id"] for row in sample])
        for row in sample:
            arch = architectures.get(row["id"])
            for name in allowed:
                row[name] = None if arch is None else _KNOBS[name][1](arch)
        columns = []
        for name, values in allowed.items():
            known = [str(v) for v in _column(name, values, sample)["values"]]
            if any(row[name] is None for row in sample):
                known.append(NOT_APPLICABLE)
            columns.append({"name": name, "values": known})
        paths: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in sample:
            values = [NOT_APPLICABLE if row[n] is None else str(row[n]) for n in allowed]
            path = paths.setdefault(
                (*values, row["band"]),
                {"values": values, "band": row["band"], "count": 0, "sum": 0.0},
            )
            path["count"] += 1
            path["sum"] += row["val_accuracy"]
        return {
            "search_id": search_id,
            "total": len(rows),
            "sampled": len(sample),
            "columns": columns,
            "bands": bands,
            "paths": [
                {
                    "values": p["values"],
                    "band": p["band"],
                    "count": p["count"],
                    "mean_accuracy": p["sum"] / p["count"],
                }
                for p in paths.values()
            ],
        }

    return cached(db, search_id, ("knob_paths", max_trials), compute)


def _finite(values: Sequence[float | None]) -> list[float]:
    """Missing overheads placed beyond the largest one (thinning needs finite numbers)."""
    present = [v for v in values if v is not None]
    beyond = (max(present) * 2 + 1) if present else 0.0
    return [beyond if v is None else v for v in values]


def _column(name: str, allowed: list[Any], rows: Sequence[Row]) -> dict[str, Any]:
    kind = _KNOBS[name][0]
    if kind == "numeric":
        return _numeric_column(name, rows, role="knob", allowed=allowed)
    seen = {row[name] for row in rows if row[name] is not None}
    extra = sorted((v for v in seen if v not in allowed), key=str)
    return {"name": name, "kind": "categorical", "role": "knob", "values": allowed + extra}


def _numeric_column(
    name: str, rows: Sequence[Row], role: str, allowed: Sequence[Any] = ()
) -> dict[str, Any]:
    present = [row[name] for row in rows if row[name] is not None] + list(allowed)
    out: dict[str, Any] = {
        "name": name,
        "kind": "numeric",
        "role": role,
        "range": [min(present), max(present)] if present else None,
    }
    if allowed:
        out["values"] = sorted(set(allowed) | {v for v in present})
    if name == "reduction":
        out["log"] = True
    return out


# -- ablation ----------------------------------------------------------------------------------


def _placement(arch: Architecture) -> str:
    where = "all" if arch.stages is None else "s" + _encode(arch.stages)
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
        lambda a: _encode(a.pool_types) if a.pool_types else None,
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
        "accuracy_max": max(accuracies) if accuracies else None,
        "overhead_pct_mean": pct_mean,
        "overhead_pct_std": pct_std,
    }


def ablation(db: Database, search_id: str, overhead: str = "params") -> dict[str, Any]:
    """The paper's ablation tables from this search's completed trials.

    One table per knob (``arrangement``, ``pool_types``, ``kernel_size``, ``spatial_pool``,
    ``reduction``, ``placement``), one row per value with ``n``, the mean, sample standard
    deviation and maximum of the validation accuracy (a fraction) and the mean and standard
    deviation of the overhead in percent over no attention (``overhead``'s ``*_pct`` column;
    rows without it count in ``n`` but not in those). Only CBAM trials are grouped, and only
    those whose arrangement has the knob (no kernel size for channel-only); ``left_out`` counts
    the others. Rows follow the knob's natural order: arrangements as ``ARRANGEMENTS`` lists
    them, single pools before pairs, numbers ascending, placements from the fewest stages to
    all of them (every block, then the first, then the last). Values are as ``Architecture``
    holds them, pool types joined with ``+``, placement as ``all``, ``s1+2``, ``s3/last``...
    ``baselines`` gives the same figures for each reference (no attention, SE, the paper's
    CBAM) the search has completed."""
    _, pct_column = _check_overhead(overhead)

    def compute() -> dict[str, Any]:
        rows = _load(
            db,
            search_id,
            TrialResult.val_accuracy,
            getattr(TrialResult, pct_column).label("pct"),
            TrialResult.reference,
            TrialResult.id,
        )
        architectures = _architectures(db, search_id, [row["id"] for row in rows])
        cbam: list[tuple[Architecture, Row]] = []
        for row in rows:
            arch = architectures.get(row["id"])
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


# -- learning curves ---------------------------------------------------------------------------


def learning_curves(db: Database, search_id: str, top: int = 5) -> list[dict[str, Any]]:
    """The learning curves of the ``top`` best completed trials, best first (the leaderboard's
    order: accuracy, then fewer parameters, then the lower number). Each curve is columnar:
    ``epoch`` and one list per figure of :data:`CURVE_KEYS` (None where an epoch lacks it)."""
    _check_positive("top", top)

    def compute() -> list[dict[str, Any]]:
        query = (
            select(
                TrialResult.number,
                TrialResult.label,
                TrialResult.reference,
                TrialResult.val_accuracy,
                TrialResult.params,
                TrialResult.epochs_run,
                TrialResult.learning_curve,
            )
            .where(*completed(search_id))
            .order_by(
                TrialResult.val_accuracy.desc(),
                TrialResult.params.is_(None),
                TrialResult.params,
                TrialResult.number,
            )
            .limit(top)
        )
        with db.session() as session:
            found = session.execute(query).all()
        out = []
        for number, label, reference, accuracy, params, epochs_run, curve in found:
            points = [p for p in curve or [] if isinstance(p, Mapping)]
            series: dict[str, list[Any]] = {
                "epoch": [p.get("epoch", i + 1) for i, p in enumerate(points)]
            }
            for key in CURVE_KEYS:
                series[key] = [p.get(key) for p in points]
            out.append(
                {
                    "number": number,
                    "label": label,
                    "reference": reference.value if reference else None,
                    "val_accuracy": accuracy,
                    "params": params,
                    "epochs_run": epochs_run,
                    "curve": series,
                }
            )
        return out

    return cached(db, search_id, ("curves", top), compute)


# -- importance --------------------------------------------------------------------------------


def _no_importance(trials: int, reason: str) -> dict[str, Any]:
    return {
        "importances": {},
        "trials": trials,
        "evaluator": IMPORTANCE_EVALUATOR,
        "target": "val_accuracy",
        "reason": reason,
    }


class _Completed:
    """What Optuna's importance evaluators read of a study (its completed trials and its
    direction), over trials already in memory. A real in-memory study copies every trial added
    to it (6 s for 10,000 trials)."""

    directions: ClassVar[list[StudyDirection]] = [StudyDirection.MINIMIZE]
    direction = StudyDirection.MINIMIZE

    def __init__(self, trials: list[FrozenTrial]) -> None:
        self._trials = trials

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def _is_multi_objective(self) -> bool:
        return False


def _as_loss(
    number: int,
    trial_id: int,
    accuracy: float,
    params: dict[str, Any],
    distributions: dict[str, BaseDistribution],
) -> FrozenTrial:
    """A completed trial whose single value is minus its accuracy (lower is better)."""
    return FrozenTrial(
        number=number,
        state=TrialState.COMPLETE,
        value=-accuracy,
        datetime_start=None,
        datetime_complete=None,
        params=params,
        distributions=distributions,
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=trial_id,
    )


# (database, study) -> {trial id: the completed trial as _as_loss makes it, None without knob
# values}. A completed trial never changes: each is read once per process.
_STUDY_TRIALS = Cache(maxsize=4)  # about 25 MB per 10,000 trials


def _read_study_trials(db: Database, study_name: str) -> list[FrozenTrial]:
    """The study's completed trials that have knob values, read from Optuna's tables with
    narrow queries: the ids of the completed trials, then the accuracy and the parameters of
    those not read before (a quarter of a second for 10,000 new trials, where Optuna's storage
    builds every trial with all its attributes through the ORM in six)."""
    from optuna.storages._rdb import models

    trial = models.TrialModel
    param = models.TrialParamModel
    value = models.TrialValueModel
    known: dict[int, FrozenTrial | None] = _STUDY_TRIALS.get_or_compute(
        (repr(db), study_name), dict
    )
    with db.session() as session:
        study_id = session.scalar(
            select(models.StudyModel.study_id).where(models.StudyModel.study_name == study_name)
        )
        if study_id is None:
            raise NotFound(f"study {study_name}")
        completed = select(trial.trial_id).where(
            trial.study_id == study_id, trial.state == TrialState.COMPLETE
        )
        numbers = dict(
            session.execute(
                select(trial.trial_id, trial.number).where(trial.trial_id.in_(completed))
            ).all()
        )
        new = [trial_id for trial_id in numbers if trial_id not in known]
        if len(new) > 2 * _IN_CHUNK:  # most of the study: one pass over it
            chunks: list[Any] = [completed]
        else:
            chunks = [new[start : start + _IN_CHUNK] for start in range(0, len(new), _IN_CHUNK)]
        accuracies: dict[int, float | None] = {}
        found: list[Any] = []
        for chunk in chunks:
            accuracies.update(
                session.execute(
                    select(value.trial_id, value.value).where(
                        value.trial_id.in_(chunk),
                        value.objective == 0,
                        value.value_type == value.TrialValueType.FINITE,
                    )
                ).all()
            )
            found += session.execute(
                select(
                    param.trial_id, param.param_name, param.param_value, param.distribution_json
                ).where(param.trial_id.in_(chunk))
            ).all()
    parsed: dict[str, BaseDistribution] = {}
    knobs: dict[int, tuple[dict[str, Any], dict[str, BaseDistribution]]] = {}
    for trial_id, name, internal, distribution_json in found:
        distribution = parsed.get(distribution_json)
        if distribution is None:
            distribution = parsed[distribution_json] = json_to_distribution(distribution_json)
        params, distributions = knobs.setdefault(trial_id, ({}, {}))
        params[name] = distribution.to_external_repr(internal)
        distributions[name] = distribution
    for trial_id in new:
        accuracy = accuracies.get(trial_id)
        params, distributions = knobs.get(trial_id, ({}, {}))
        usable = params and accuracy is not None and math.isfinite(accuracy)
        known[trial_id] = (
            _as_loss(numbers[trial_id], trial_id, accuracy, params, distributions)  # type: ignore[arg-type]
            if usable
            else None
        )
    return [t for trial_id in sorted(numbers) if (t := known.get(trial_id)) is not None]


def _load_study_trials(db: Database, search: Search) -> list[FrozenTrial]:
    """The same as :func:`_read_study_trials` through Optuna's storage."""
    from search.study.studies import load_study

    study = load_study(db, search)
    return [
        _as_loss(t.number, t._trial_id, t.values[0], t.params, t.distributions)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.params and t.values and math.isfinite(t.values[0])
    ]


def study_trials(db: Database, search: Search) -> list[FrozenTrial]:
    """The completed trials of the search's study that have knob values (the no-attention and
    SE references have none), each with minus its accuracy objective as its one value.

    Read straight from Optuna's tables; through Optuna's storage when those tables are not
    what this version of Optuna declares."""
    try:
        return _read_study_trials(db, search.study_name)
    except (ImportError, AttributeError, SQLAlchemyError, ValueError, KeyError) as exc:
        log.warning("reading the trials of %s through Optuna's storage: %s", search.id, exc)
        return _load_study_trials(db, search)


def importance(db: Database, search_id: str) -> dict[str, Any]:
    """Knob importances for validation accuracy, from the Optuna study, normalised to sum 1,
    most important first.

    Optuna's PED-ANOVA evaluator (how differently a knob's values are spread among the top 10%
    of trials than among all of them): it weighs conditional knobs (``kernel_size`` only where
    the arrangement has a spatial gate) in the trials that have them, and takes about 0.1 s
    at 10,000 trials. fANOVA sees only the knobs that every trial has (arrangement, stages,
    blocks: 1.7 s at 10,000 trials), or, given every knob, only the trials that have them all
    (over ten minutes). The target is the accuracy objective (the study's first value in
    either mode); trials without knob values (the no-attention and SE references, outside the
    space) are left out.

    Computed once per change (keyed by the search and its number of completed trial rows).
    With fewer than :data:`MIN_IMPORTANCE_TRIALS` trials, or when no knob takes two values,
    ``importances`` is empty and ``reason`` says why."""

    def compute() -> dict[str, Any]:
        with db.session() as session:
            search = session.get(Search, search_id)
        if search is None:
            raise NotFound(f"search {search_id}")
        trials = study_trials(db, search)
        if len(trials) < MIN_IMPORTANCE_TRIALS:
            return _no_importance(
                len(trials),
                f"{len(trials)} completed trial(s) with knob values; importances need "
                f"at least {MIN_IMPORTANCE_TRIALS}",
            )
        seen: dict[str, set[str]] = {}
        for trial in trials:
            for name, value in trial.params.items():
                seen.setdefault(name, set()).add(repr(value))
        varying = sorted(name for name, values in seen.items() if len(values) > 1)
        if not varying:
            return _no_importance(len(trials), "every trial has the same knob values")
        with warnings.catch_warnings():
            # PED-ANOVA warns about sparse regimes of conditional knobs in small studies.
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                _Completed(trials),  # type: ignore[arg-type]
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                params=varying,
            )
        ranked = sorted(values.items(), key=lambda item: (-item[1], item[0]))
        return {
            "importances": {name: float(value) for name, value in ranked},
            "trials": len(trials),
            "evaluator": IMPORTANCE_EVALUATOR,
            "target": "val_accuracy",
            "reason": None,
        }

    count, _ = version(db, search_id)
    return CACHE.get_or_compute((repr(db), search_id, count, "importance"), compute)
