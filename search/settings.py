"""The one settings object: where the database, artifacts and data are, and the service's limits.

Every value comes from the environment with the prefix ``CBAM_NAS_`` (``CBAM_NAS_DATABASE_URL``,
``CBAM_NAS_PORT``, ...), else from the defaults below, which keep all state under ``./.cbam-nas``
so that a checkout works with nothing configured. Read it through :func:`get_settings`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

STATE_DIR = Path(".cbam-nas")


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix="CBAM_NAS_", extra="ignore", frozen=True)

    database_url: str = Field(
        default=f"sqlite:///{STATE_DIR / 'cbam-nas.db'}",
        description="SQLAlchemy URL; PostgreSQL as postgresql+psycopg://user:password@host/db.",
    )
    optuna_storage_url: str | None = Field(
        default=None,
        description="grpc://HOST:PORT: Optuna's studies go through this gRPC storage proxy "
        "(`cbam-nas storage-proxy` on database_url); our own tables still use database_url. "
        "Unset: Optuna uses database_url directly.",
    )
    artifacts_dir: Path = Field(
        default=STATE_DIR / "artifacts",
        description="Where trial artifacts (weights, architecture JSON, metrics) are stored.",
    )
    data_dir: Path = Field(
        default=STATE_DIR / "data", description="Where datasets are downloaded and cached."
    )
    data_roots: str = Field(
        default="",
        description="The directories a search's dataset paths (dataset.options.root) may lie "
        "in, separated by the OS path separator (':' on Linux); empty: data_dir only. A path "
        "elsewhere (symlinks followed) is refused at submit (422, exit code 2) and by workers.",
    )
    allow_downloads: bool = Field(
        default=True,
        description="Whether a search may have workers download its dataset "
        "(dataset.options.download: true). False: such a spec is refused at submit (422, exit "
        "code 2) and by workers, and the files must already lie under a data root.",
    )
    cache_dir: Path = Field(
        default=STATE_DIR / "cache",
        description="Files made on demand from artifacts (ONNX exports), safe to delete.",
    )
    token_file: Path = Field(
        default=STATE_DIR / "token",
        description="The admin token `cbam-nas serve` creates on first start (mode 0600); "
        "the CLI reads it when no token is given.",
    )
    token: SecretStr | None = Field(
        default=None, description="The API token the CLI sends (else the token file's)."
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000", description="The server the CLI's client commands call."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_trials_per_search: int = Field(
        default=1000, ge=1, description="The largest trial budget one search may ask for."
    )
    max_request_bytes: int = Field(
        default=1_048_576, ge=1024, description="Requests with a larger body are refused (413)."
    )
    db_retry_s: float = Field(
        default=300.0,
        ge=0,
        description="How long a worker in a trial waits for an unavailable database (a restart, "
        "a failover), retrying with backoff, before it gives up and exits.",
    )
    read_open: bool = Field(
        default=False,
        description="Let callers without a token read (GET) searches and leaderboards.",
    )
    cpu_kernels: bool = Field(
        default=True,
        description="Compile and use the hand-written C++ CBAM kernels on CPU (needs a C++ "
        "compiler; about a minute once per machine); off: the torch-op path.",
    )
    kernel_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "cbam-nas",
        description="Where the compiled CPU kernels are kept, per machine (not per state dir).",
    )

    # Optional S3-compatible artifact store; artifacts stay in artifacts_dir when no bucket is set.
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str | None = None

    @property
    def s3_enabled(self) -> bool:
        return bool(self.s3_bucket)

    @property
    def allowed_data_roots(self) -> tuple[Path, ...]:
        """``data_roots`` as paths, else ``data_dir`` alone."""
        named = [Path(p).expanduser() for p in self.data_roots.split(os.pathsep) if p.strip()]
        return tuple(named) or (self.data_dir,)

    @property
    def sqlite_path(self) -> Path | None:
        """The database file when the database is SQLite on disk, else None. (SQLAlchemy is
        imported here: the torch modules read these settings on a GPU box that may lack it.)"""
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database)

    def ensure_dirs(self) -> None:
        """Create the local directories this configuration writes to (SQLite does not)."""
        for directory in (self.artifacts_dir, self.data_dir, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if self.sqlite_path is not None:
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests call ``get_settings.cache_clear()``."""
    return Settings()
