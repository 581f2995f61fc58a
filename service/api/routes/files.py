"""Downloads of a trial's files: the stored artifacts, ONNX exported on demand, and the model
bundle (search.bundle) as one zip archive, per trial or for the search's answer.

The ONNX file is made from the stored weights on first request and kept under the cache
directory (per search, removed with it). A bundle is assembled per request: its card carries
the search's evidence, which changes while confirmation runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, StreamingResponse

from search.bundle import archive
from search.errors import Conflict, NotFound
from search.results.bundles import trial_bundle
from search.results.queries import get_search, recommendation, trial
from search.settings import Settings
from search.store.artifacts import MEDIA_TYPES, open_artifact, read_artifact
from search.store.models import TrialResult
from service.api.deps import DB, AppSettings, Attempt, Overhead, Reader, Store, TrialNumber
from service.api.made_files import made_once

router = APIRouter(prefix="/searches/{search_id}", tags=["downloads"], dependencies=[Reader])

FileName = Enum("FileName", {name: name for name in MEDIA_TYPES}, type=str)  # type: ignore[misc]
WithOnnx = Annotated[
    bool, Query(description="Also model.onnx (exported from the weights on first request).")
]
_CHUNK = 1 << 20
_ZIP = {200: {"content": {"application/zip": {}}, "description": "The bundle as a zip archive."}}


def export_dir(settings: Settings, search_id: str) -> Path:
    return settings.cache_dir / "onnx" / search_id


@router.get(
    "/trials/{number}/files/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/json": {}}}},
)
def download(
    db: DB,
    settings: AppSettings,
    store: Store,
    search_id: str,
    number: TrialNumber,
    name: FileName,  # type: ignore[valid-type]
    attempt: Attempt = None,
) -> Any:
    """``weights.safetensors``, ``architecture.json``, ``metrics.json`` or ``model.onnx`` (made
    from the weights on first request) of a completed trial."""
    row = trial(db, search_id, number, attempt)
    artifacts = row.artifacts or {}
    if not artifacts:
        raise Conflict(
            f"trial {number} of search {search_id} is {row.state.value}: only completed "
            "trials have files"
        )
    filename = f"{search_id[:8]}-trial{number}-{name.value}"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if name.value == "model.onnx":
        path = _onnx(settings, store, row)
        return FileResponse(path, media_type=MEDIA_TYPES[name.value], headers=headers)
    artifact_id = artifacts.get(name.value)
    what = f"{name.value} of trial {number} of search {search_id}"
    if artifact_id is None:
        raise NotFound(what)
    # Opened before the response starts, so that a missing file is a 404, not a broken stream.
    context = open_artifact(store, artifact_id, what)
    stream = context.__enter__()

    def chunks() -> Iterator[bytes]:
        try:
            while chunk := stream.read(_CHUNK):
                yield chunk
        finally:
            context.__exit__(None, None, None)

    return StreamingResponse(chunks(), media_type=MEDIA_TYPES[name.value], headers=headers)


def _onnx(settings: Settings, store: Any, row: TrialResult) -> Path:
    path = export_dir(settings, row.search_id) / f"{row.number}-{row.attempt}.onnx"

    def export() -> bytes:
        from safetensors.torch import load as load_safetensors

        from search.export import export_onnx
        from search.space import Architecture

        artifacts = row.artifacts or {}
        what = f"files of trial {row.number} of search {row.search_id}"
        weights = load_safetensors(read_artifact(store, artifacts["weights.safetensors"], what))
        metrics = json.loads(read_artifact(store, artifacts["metrics.json"], what))
        input_shape = (metrics.get("overhead") or {}).get("input_shape")
        return export_onnx(
            Architecture.from_dict(row.architecture),
            weights,
            input_size=input_shape[-1] if input_shape else None,
        )

    return made_once(path, export)


@router.get("/trials/{number}/bundle", response_class=Response, responses=_ZIP)
def bundle(
    db: DB,
    settings: AppSettings,
    store: Store,
    search_id: str,
    number: TrialNumber,
    attempt: Attempt = None,
    onnx: WithOnnx = False,
) -> Response:
    """A completed trial as a model bundle: weights.safetensors (the card in its header),
    model.json (backbone, architecture, classes and their names, input size, preprocessing,
    dataset, spec, seeds, metrics with their uncertainty), README.md, architecture.json and
    metrics.json; load it with ``search.load_model``."""
    return _bundle(db, settings, store, trial(db, search_id, number, attempt), onnx, "params")


@router.get("/best/bundle", response_class=Response, responses=_ZIP)
def best_bundle(
    db: DB,
    settings: AppSettings,
    store: Store,
    search_id: str,
    overhead: Overhead = Overhead("params"),  # type: ignore[valid-type]
    onnx: WithOnnx = False,
) -> Response:
    """The search's answer (as ``/best``: the recommended architecture's best run) as a
    model bundle, with the evidence for it in its card."""
    row = recommendation(db, search_id, overhead.value)[0]
    return _bundle(db, settings, store, row, onnx, overhead.value)


def _bundle(
    db: Any, settings: Settings, store: Any, row: TrialResult, onnx: bool, overhead: str
) -> Response:
    search = get_search(db, row.search_id)
    files = trial_bundle(db, store, search, row, overhead)
    if onnx:
        files["model.onnx"] = _onnx(settings, store, row).read_bytes()
    folder = f"cbam-nas-{row.search_id[:8]}-trial{row.number}"
    return Response(
        archive(files, folder),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{folder}.zip"'},
    )
