"""Where trial artifacts live: Optuna's artifact stores, on a file system or S3-compatible.

Each completed trial stores ``weights.safetensors``, ``architecture.json``, ``metrics.json``,
``samples.safetensors`` (a few validation images with their labels and the normalisation's mean
and std, for the attention pictures) and ``model.json`` (the model's card, search.bundle);
trials stored before either have none of it. Their artifact ids are
kept on the trial-result row (``TrialResult.artifacts``) so that downloads need no Optuna reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from search.errors import InvalidValue, NotFound
from search.settings import Settings

SAMPLES_FILE = "samples.safetensors"
CARD_FILE = "model.json"  # search.bundle's card; trials stored before it have none
ARTIFACT_FILES = (
    "weights.safetensors",
    "architecture.json",
    "metrics.json",
    SAMPLES_FILE,
    CARD_FILE,
)
MEDIA_TYPES = {
    "weights.safetensors": "application/octet-stream",
    "architecture.json": "application/json",
    "metrics.json": "application/json",
    CARD_FILE: "application/json",
    SAMPLES_FILE: "application/octet-stream",
    "model.onnx": "application/octet-stream",
}


def artifact_store(settings: Settings, artifacts_dir: Path | None = None) -> Any:
    """An S3-compatible store when the settings name a bucket, else files in ``artifacts_dir``
    (default: the settings')."""
    from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore

    if settings.s3_enabled:
        try:
            import boto3
        except ImportError as exc:
            raise InvalidValue(
                "s3_bucket", settings.s3_bucket, "unset (boto3 is not installed)"
            ) from exc
        secret = settings.s3_secret_access_key
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            region_name=settings.s3_region,
        )
        return Boto3ArtifactStore(settings.s3_bucket or "", client=client)
    directory = Path(artifacts_dir or settings.artifacts_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(directory)


@contextlib.contextmanager
def open_artifact(store: Any, artifact_id: str, what: str) -> Iterator[IO[bytes]]:
    """The stored file as a binary stream; :class:`NotFound` (naming ``what``) if it is gone."""
    try:
        stream = store.open_reader(artifact_id)
    except Exception as exc:  # each store raises its own "missing" error
        raise NotFound(what) from exc
    with stream:
        yield stream


def read_artifact(store: Any, artifact_id: str, what: str) -> bytes:
    with open_artifact(store, artifact_id, what) as stream:
        return stream.read()


def remove_artifacts(store: Any, artifact_ids: Iterable[str]) -> None:
    """Remove stored files; ones already gone are skipped."""
    for artifact_id in artifact_ids:
        with contextlib.suppress(Exception):
            store.remove(artifact_id)
