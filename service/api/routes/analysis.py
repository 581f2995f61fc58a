"""A search's analyses for the dashboard's search page: the Pareto scatter, parallel
coordinates of the knobs, the paper's ablation tables, learning curves and knob importances.

Each answer is computed and encoded in the process once per change of the search (see
``search.results.cache``), and carries an ETag: polling an unchanged search gets 304."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from search.results import ablation as ablation_view
from search.results import curves as curves_view
from search.results import importance as importance_view
from search.results import knob_views
from search.results import scatter as scatter_view
from service.api.analysis_schemas import (
    AblationOut,
    CurveOut,
    ImportanceOut,
    KnobPathsOut,
    KnobsOut,
    ScatterOut,
)
from service.api.deps import DB, Overhead, Reader
from service.api.encoded import json_answer

router = APIRouter(prefix="/searches/{search_id}", tags=["analysis"], dependencies=[Reader])

MaxPoints = Annotated[
    int,
    Query(
        ge=10,
        le=20_000,
        description="Thin to about this many points (Pareto and references always kept).",
    ),
]


def answers(model: object) -> dict[int | str, dict[str, object]]:
    """The document's responses of an analysis route: ``model`` as JSON, or 304 when the
    caller's ETag is current (the routes answer pre-encoded bytes, so FastAPI cannot infer
    it)."""
    return {200: {"model": model}, 304: {"description": "Not modified"}}


@router.get("/scatter", responses=answers(ScatterOut))
def scatter(
    request: Request,
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    max_points: MaxPoints = scatter_view.DEFAULT_MAX_POINTS,
) -> Response:
    """Completed trials as points of validation accuracy against ``overhead``, with the Pareto
    flag, the reference name and the architecture's label; thinned above ``max_points``
    (``total`` / ``shown``)."""
    return json_answer(request, db, search_id, scatter_view.scatter, overhead.value, max_points)


@router.get("/knobs", responses=answers(KnobsOut))
def knobs(
    request: Request,
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    max_points: MaxPoints = scatter_view.DEFAULT_MAX_POINTS,
) -> Response:
    """Parallel coordinates: the knob columns (categorical with their values, or numeric with
    their range) and the completed trials' knob values with accuracy and overhead."""
    return json_answer(request, db, search_id, knob_views.knobs, overhead.value, max_points)


@router.get("/knob-paths", responses=answers(KnobPathsOut))
def knob_paths(
    request: Request,
    db: DB,
    search_id: str,
    max_trials: Annotated[
        int, Query(ge=10, le=20_000, description="Draw the paths from a sample of this many.")
    ] = knob_views.DEFAULT_PATH_TRIALS,
) -> Response:
    """Parallel categories: the completed trials in accuracy bands (top 10 %, 10-25 %, 25-50 %,
    the rest), grouped by their knob values into paths with a count and mean accuracy."""
    return json_answer(request, db, search_id, knob_views.knob_paths, max_trials)


@router.get("/ablation", responses=answers(AblationOut))
def ablation(
    request: Request,
    db: DB,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
) -> Response:
    """The paper's ablation tables: accuracy and overhead (mean, std) of the CBAM trials grouped
    by arrangement, channel pooling, kernel size, spatial pooling, reduction and placement; the
    references apart as ``baselines``."""
    return json_answer(request, db, search_id, ablation_view.ablation, overhead.value)


@router.get("/curves", responses=answers(list[CurveOut]))
def curves(
    request: Request, db: DB, search_id: str, top: Annotated[int, Query(ge=1, le=50)] = 5
) -> Response:
    """Per-epoch validation accuracy and losses of the ``top`` best completed trials."""
    return json_answer(request, db, search_id, curves_view.learning_curves, top)


@router.get("/importance", responses=answers(ImportanceOut))
def importance(request: Request, db: DB, search_id: str) -> Response:
    """Knob importances for validation accuracy (Optuna's PED-ANOVA); empty with a ``reason``
    while there are too few trials."""
    return json_answer(request, db, search_id, importance_view.importance)
