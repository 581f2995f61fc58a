"""A completed trial as a model bundle (search.bundle): its stored card completed with the
search it came from, the seeds its architecture ran on and the evidence behind its figures.

Trials stored before cards existed have no ``model.json``: their card is rebuilt from what
they did store (the weights' shapes, the input shape measured, the normalisation kept with
the sample images); without that normalisation there is no honest preprocessing to state,
and the bundle is refused.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from search.bundle import bundle_files, model_card, weight_dims, with_search
from search.errors import Conflict
from search.results.cache import completed
from search.results.leaderboard import evidence
from search.results.queries import Ranking, ranking
from search.space import Architecture
from search.store.artifacts import CARD_FILE, SAMPLES_FILE, read_artifact
from search.store.engine import Database
from search.store.models import Phase, ResultState, Search, TrialResult

# What a bundle holds besides the files search.bundle makes.
STORED_FILES = ("architecture.json", "metrics.json")


def trial_bundle(
    db: Database, store: Any, search: Search, row: TrialResult, overhead: str = "params"
) -> dict[str, bytes]:
    """The bundle's files for ``row`` (weights with the card in their header, model.json,
    README.md, architecture.json, metrics.json), by file name."""
    from safetensors.torch import load

    artifacts = row.artifacts or {}
    if row.state != ResultState.completed or "weights.safetensors" not in artifacts:
        raise Conflict(
            f"trial {row.number} of search {search.id} is {row.state.value}: only completed "
            "trials with stored weights can be bundled"
        )
    what = f"files of trial {row.number} of search {search.id}"
    weights = load(read_artifact(store, artifacts["weights.safetensors"], what))
    metrics = json.loads(read_artifact(store, artifacts["metrics.json"], what))
    if CARD_FILE in artifacts:
        card = json.loads(read_artifact(store, artifacts[CARD_FILE], what))
    else:
        card = _rebuilt_card(store, search, row, weights, metrics, what)
    entry, ranked = board_entry(db, row, overhead)
    card = with_search(
        card,
        search_id=search.id,
        spec=search.spec,
        seeds=seeds_of(db, row),
        evidence=None if entry is None else evidence(entry, ranked.confirmed, ranked.top_group),
    )
    files = bundle_files(card, weights)
    for name in STORED_FILES:
        if name in artifacts:
            files[name] = read_artifact(store, artifacts[name], what)
    return files


def _rebuilt_card(
    store: Any,
    search: Search,
    row: TrialResult,
    weights: dict[str, Any],
    metrics: dict[str, Any],
    what: str,
) -> dict[str, Any]:
    from safetensors.torch import load

    artifacts = row.artifacts or {}
    if SAMPLES_FILE not in artifacts:
        raise Conflict(
            f"trial {row.number} of search {search.id} was stored before cbam-nas kept the "
            "normalisation it trained with: no bundle can state its preprocessing"
        )
    samples = load(read_artifact(store, artifacts[SAMPLES_FILE], what))
    architecture = Architecture.from_dict(row.architecture)
    num_classes, in_channels = weight_dims(architecture, weights)
    shape = (metrics.get("overhead") or {}).get("input_shape")
    return model_card(
        architecture,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=int(shape[-1]) if shape else architecture.info.input_size,
        mean=samples["mean"].tolist(),
        std=samples["std"].tolist(),
        dataset=search.spec.get("dataset"),
        trial={
            "search_id": search.id,
            "number": row.number,
            "attempt": row.attempt,
            "phase": row.phase.value,
            "seed": row.seed,
            "epochs": row.fidelity_epochs,
            "epochs_run": row.epochs_run,
        },
        metrics={
            "val_accuracy": row.val_accuracy,
            "final_val_accuracy": row.final_val_accuracy,
            "test_accuracy": row.test_accuracy,
            "val_images": row.val_images,
        },
    )


def board_entry(
    db: Database, row: TrialResult, overhead: str = "params"
) -> tuple[dict[str, Any] | None, Ranking]:
    """The board entry ``row`` counts in (its architecture's once confirmed, its own before);
    None when it is on no board (not completed, or an exploration run once confirmed)."""
    ranked = ranking(db, row.search_id, overhead)
    if ranked.confirmed:
        if row.phase != Phase.confirm:
            return None, ranked
        return next((e for e in ranked.entries if e["arch_id"] == row.arch_id), None), ranked
    return next((e for e in ranked.entries if e["id"] == row.id), None), ranked


def seeds_of(db: Database, row: TrialResult) -> list[int]:
    """The seeds ``row``'s architecture completed on in its phase (one: an exploration run)."""
    if row.phase != Phase.confirm:
        return [] if row.seed is None else [row.seed]
    with db.session() as session:
        found = session.scalars(
            select(TrialResult.seed).where(
                *completed(row.search_id),
                TrialResult.phase == Phase.confirm,
                TrialResult.arch_id == row.arch_id,
            )
        )
        return sorted({seed for seed in found if seed is not None})
