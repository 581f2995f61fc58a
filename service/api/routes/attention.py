"""A trial's attention pictures (the dashboard's trial page): CBAM's spatial and channel gates and
Grad-CAM of the last stage for a few validation images.

Computed on first request from the stored weights and the sample images the worker stores with
each completed trial (``samples.safetensors``), with :func:`search.attention_maps.attention_report`;
the JSON is kept under the cache directory (per search) and served from there afterwards. A lock
per file keeps two requests from computing it twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Response

from search.errors import Conflict, NotFound
from search.results.queries import trial
from search.settings import Settings
from search.store.artifacts import SAMPLES_FILE, read_artifact
from search.store.models import TrialResult
from service.api.analysis_schemas import AttentionOut
from service.api.deps import DB, AppSettings, Attempt, Reader, Store, TrialNumber
from service.api.made_files import made_once

router = APIRouter(prefix="/searches/{search_id}", tags=["attention"], dependencies=[Reader])

IMAGES = 4
"""How many of the stored sample images a report shows."""


def attention_dir(settings: Settings, search_id: str) -> Path:
    return settings.cache_dir / "attention" / search_id


@router.get(
    "/trials/{number}/attention",
    response_class=Response,
    responses={200: {"model": AttentionOut}},
)
def attention(
    db: DB,
    settings: AppSettings,
    store: Store,
    search_id: str,
    number: TrialNumber,
    attempt: Attempt = None,
) -> Response:
    """Spatial attention maps (each at its block's resolution), channel gate values, Grad-CAM of
    the last stage, label and prediction for the first validation images of a completed trial.
    See :func:`search.attention_maps.attention_report` for the fields."""
    row = trial(db, search_id, number, attempt)
    if not row.artifacts:
        raise Conflict(
            f"trial {number} of search {search_id} is {row.state.value}: only completed "
            "trials have attention pictures"
        )
    return Response(_report(settings, store, row), media_type="application/json")


def _report(settings: Settings, store: object, row: TrialResult) -> bytes:
    path = attention_dir(settings, row.search_id) / f"{row.number}-{row.attempt}.json"

    def compute() -> bytes:
        artifacts = row.artifacts or {}
        what = f"{{}} of trial {row.number} of search {row.search_id}"
        if SAMPLES_FILE not in artifacts:
            raise NotFound(what.format("sample images (stored before attention pictures)"))
        from safetensors.torch import load as load_safetensors

        from search.attention_maps import attention_report

        weights_id = artifacts.get("weights.safetensors")
        if weights_id is None:
            raise NotFound(what.format("weights.safetensors"))
        weights = load_safetensors(read_artifact(store, weights_id, what.format("weights")))
        samples = load_safetensors(
            read_artifact(store, artifacts[SAMPLES_FILE], what.format("sample images"))
        )
        report = attention_report(row.architecture, weights, samples, max_images=IMAGES)
        return json.dumps(report, separators=(",", ":")).encode()

    return made_once(path, compute).read_bytes()
