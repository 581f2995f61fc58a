"""A search's analyses for the dashboard's search page: the Pareto scatter, parallel
coordinates of the knobs, the paper's ablation tables, learning curves and knob importances.

Each answer is computed in the process once per change of the search (see ``search.analysis``)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Query

from search import analysis
from search.leaderboard import OVERHEAD_COLUMNS
from service.api.deps import DB, Reader

router = APIRouter(prefix="/searches/{search_id}", tags=["analysis"], dependencies=[Reader])

Overhead = Enum("Overhead", {name: name for name in OVERHEAD_COLUMNS}, type=str)  # type: ignore[misc]
MaxPoints = Annotated[
    int,
    Query(
        ge=10,
        le=20_000,
        description="Thin to about this many points (Pareto and references always kept).",
    ),
]


@router.get("/scatter")
def scatter(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    max_points: MaxPoints = analysis.DEFAULT_MAX_POINTS,
) -> dict[str, Any]:
    """Completed trials as points of validation accuracy against ``overhead``, with the Pareto
    flag, the reference name and the architecture's label; thinned above ``max_points``
    (``total`` / ``shown``)."""
    return analysis.scatter(db, search_id, overhead.value, max_points)


@router.get("/knobs")
def knobs(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    max_points: MaxPoints = analysis.DEFAULT_MAX_POINTS,
) -> dict[str, Any]:
    """Parallel coordinates: the knob columns (categorical with their values, or numeric with
    their range) and the completed trials' knob values with accuracy and overhead."""
    return analysis.knobs(db, search_id, overhead.value, max_points)


@router.get("/ablation")
def ablation(
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
) -> dict[str, Any]:
    """The paper's ablation tables: accuracy and overhead (mean, std) of the CBAM trials grouped
    by arrangement, channel pooling, kernel size, spatial pooling, reduction and placement; the
    references apart as ``baselines``."""
    return analysis.ablation(db, search_id, overhead.value)


@router.get("/curves")
def curves(
    db: DB, search_id: str, top: Annotated[int, Query(ge=1, le=50)] = 5
) -> list[dict[str, Any]]:
    """Per-epoch validation accuracy and losses of the ``top`` best completed trials."""
    return analysis.learning_curves(db, search_id, top)


@router.get("/importance")
def importance(db: DB, search_id: str) -> dict[str, Any]:
    """Knob importances for validation accuracy (Optuna's PED-ANOVA); empty with a ``reason``
    while there are too few trials."""
    return analysis.importance(db, search_id)
