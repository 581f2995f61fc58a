"""The knobs of a search's trials, for parallel coordinates (every trial's values, thinned as
the scatter is) and parallel categories (the paths through the knob values, banded by accuracy).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from search.errors import NotFound
from search.knobs import has_channel_gate, has_spatial_gate
from search.pareto import pareto_flags
from search.results.cache import cached
from search.results.rows import Row, architectures, check_overhead, check_positive, load_rows
from search.results.scatter import DEFAULT_MAX_POINTS, thin
from search.space import Architecture, encode_choice
from search.spec import SearchSpec
from search.store.models import Search, TrialResult

if TYPE_CHECKING:
    from search.store.engine import Database

# Trials sampled for the knob paths: parcats draws ~100 ms per 1,000 distinct paths.
DEFAULT_PATH_TRIALS = 1000


def _stages(arch: Architecture) -> str | None:
    if arch.attention == "none":
        return None
    return encode_choice(arch.stages or arch.info.stages)


# knob -> (kind, value of an architecture (None where it does not apply))
_KNOBS: dict[str, tuple[str, Callable[[Architecture], Any]]] = {
    "arrangement": ("categorical", lambda a: a.arrangement),
    "reduction": ("numeric", lambda a: a.reduction),
    "pool_types": ("categorical", lambda a: encode_choice(a.pool_types) if a.pool_types else None),
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
        values["pool_types"] = [encode_choice(p) for p in space.pool_types]
        values["mlp_bias"] = list(space.mlp_bias)
    if spatial:
        values["kernel_size"] = sorted(space.kernel_sizes)
        values["spatial_pool"] = list(space.spatial_pools)
        values["spatial_bn"] = list(space.spatial_bn)
    values["stages"] = [encode_choice(s) for s in space.stage_choices(spec.backbone)]
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
    column, pct_column = check_overhead(overhead)
    check_positive("max_points", max_points)

    def compute() -> dict[str, Any]:
        allowed = _space_values(_spec(db, search_id))
        rows = load_rows(
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
        archs = architectures(db, search_id, [rows[i]["id"] for i in shown])
        out_rows = []
        for i in shown:
            row = rows[i]
            arch = archs.get(row["id"])
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
    check_positive("max_trials", max_trials)

    def compute() -> dict[str, Any]:
        allowed = _space_values(_spec(db, search_id))
        rows = load_rows(
            db, search_id, TrialResult.id, TrialResult.number, TrialResult.val_accuracy
        )
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
        archs = architectures(db, search_id, [row["id"] for row in sample])
        for row in sample:
            arch = archs.get(row["id"])
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
