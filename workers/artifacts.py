"""What a worker stores for a completed trial: weights, architecture, metrics and a few
validation images (see :mod:`search.store.artifacts` for where they live)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from search.bundle import CARD_FILE, CARD_KEY
from search.overhead import OverheadReport
from search.preprocessing import NORMALISATION
from search.space import Architecture
from search.store.artifacts import ARTIFACT_FILES, SAMPLES_FILE
from search.store.engine import Database
from workers.data import DatasetTensors, StreamingData
from workers.train import TrainResult

ARTIFACTS_ATTR = "artifacts"
SAMPLE_IMAGES = 8
"""How many validation images are stored with each completed trial (the dashboard's attention
pictures are computed from them)."""


def validation_samples(
    data: DatasetTensors | StreamingData, count: int = SAMPLE_IMAGES
) -> dict[str, Any] | None:
    """The first ``count`` validation images (the test set's when there is no validation set) as
    ``images`` (uint8 NCHW), ``labels`` (int64) and the per-channel ``mean`` and ``std`` (float32,
    [0, 1] units) that training normalises with: ``(images / 255 - mean) / std``. None when
    there are no such images."""
    if isinstance(data, StreamingData):
        files = data.val if len(data.val) else data.test
        if files is None or not len(files):
            return None
        decoded = [files[i] for i in range(min(count, len(files)))]
        images = torch.stack([image for image, _ in decoded])
        labels = torch.tensor([label for _, label in decoded], dtype=torch.int64)
    else:
        x, y = data.val_x, data.val_y
        if not len(y) and data.test_x is not None and data.test_y is not None:
            x, y = data.test_x, data.test_y
        if not len(y):
            return None
        images, labels = x[:count], y[:count]
    return {
        "images": images.to(torch.uint8).contiguous().clone(),
        "labels": labels.to(torch.int64).contiguous().clone(),
        "mean": torch.tensor(data.mean, dtype=torch.float32),
        "std": torch.tensor(data.std, dtype=torch.float32),
    }


def store_artifacts(
    store: Any,
    owner: optuna.Trial | optuna.Study,
    architecture: Architecture,
    result: TrainResult,
    overhead: OverheadReport,
    samples: dict[str, Any] | None = None,
    db: Database | None = None,
    card: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Upload weights, architecture, metrics and (when given) the sample images of
    :func:`validation_samples` and the model's card (``model.json``, also in the weights'
    header: :mod:`search.bundle`) under ``owner`` (the trial; the study for a confirmation run,
    which has no trial); returns file name -> artifact id (also set as a trial's user attribute
    ``artifacts``). With ``db`` each upload is retried through its outages."""
    from optuna.artifacts import upload_artifact
    from safetensors.torch import save_file

    def call(fn: Callable[[], Any], what: str) -> Any:
        return fn() if db is None else db.retrying(fn, what=what)

    ids: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cbam-nas-") as tmp:
        folder = Path(tmp)
        header = {"architecture": architecture.to_json()}
        if card is not None:
            header[CARD_KEY] = json.dumps(card)
            (folder / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
        save_file(result.state_dict, str(folder / "weights.safetensors"), metadata=header)
        (folder / "architecture.json").write_text(architecture.to_json())
        metrics = {**result.metrics(), "overhead": overhead.to_dict()}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if samples is not None:
            save_file(
                samples, str(folder / SAMPLES_FILE), metadata={"normalisation": NORMALISATION}
            )
        for name in ARTIFACT_FILES:
            if not (folder / name).exists():
                continue
            path = str(folder / name)
            ids[name] = call(
                lambda path=path: upload_artifact(
                    artifact_store=store, file_path=path, study_or_trial=owner
                ),
                f"storing {name}",
            )
    if isinstance(owner, optuna.Trial):
        call(lambda: owner.set_user_attr(ARTIFACTS_ATTR, ids), "storing artifact ids")
    return ids
