from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from search.settings import Settings, get_settings


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CBAM_NAS_* variable at all, not even the ones conftest sets."""
    for name in list(os.environ):
        if name.startswith("CBAM_NAS_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()


def test_defaults_keep_state_under_dot_cbam_nas(bare_env: None) -> None:
    s = Settings()
    assert s.database_url == "sqlite:///.cbam-nas/cbam-nas.db"
    assert s.sqlite_path == Path(".cbam-nas/cbam-nas.db")
    assert s.artifacts_dir == Path(".cbam-nas/artifacts")
    assert s.data_dir == Path(".cbam-nas/data")
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.max_trials_per_search == 1000
    assert s.max_request_bytes == 1_048_576
    assert s.read_open is False
    assert s.s3_bucket is None and s.s3_endpoint_url is None and s.s3_secret_access_key is None
    assert not s.s3_enabled


def test_environment_overrides(bare_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBAM_NAS_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/cbam")
    monkeypatch.setenv("CBAM_NAS_PORT", "9001")
    monkeypatch.setenv("CBAM_NAS_READ_OPEN", "true")
    monkeypatch.setenv("CBAM_NAS_MAX_TRIALS_PER_SEARCH", "50")
    monkeypatch.setenv("CBAM_NAS_ARTIFACTS_DIR", "/srv/artifacts")
    monkeypatch.setenv("CBAM_NAS_S3_BUCKET", "trials")
    monkeypatch.setenv("CBAM_NAS_S3_SECRET_ACCESS_KEY", "hunter2")
    s = get_settings()
    assert s.database_url == "postgresql+psycopg://u:p@db:5432/cbam"
    assert s.sqlite_path is None
    assert s.port == 9001
    assert s.read_open is True
    assert s.max_trials_per_search == 50
    assert s.artifacts_dir == Path("/srv/artifacts")
    assert s.s3_enabled and s.s3_bucket == "trials"
    assert s.s3_secret_access_key is not None
    assert s.s3_secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s)


def test_unprefixed_variables_are_ignored(bare_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    assert Settings().port == 8000


def test_get_settings_is_cached_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("CBAM_NAS_PORT", "8123")
    assert get_settings().port == first.port
    get_settings.cache_clear()
    assert get_settings().port == 8123


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "0"), ("PORT", "70000"), ("MAX_TRIALS_PER_SEARCH", "0"), ("READ_OPEN", "maybe")],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"CBAM_NAS_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_settings_are_immutable(settings: Settings) -> None:
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_tests_never_write_into_the_checkout(settings: Settings, tmp_path: Path) -> None:
    assert settings.sqlite_path is not None
    assert settings.sqlite_path.is_relative_to(tmp_path)
    assert settings.artifacts_dir.is_relative_to(tmp_path)
    assert not settings.data_dir.is_relative_to(Path.cwd())


def test_ensure_dirs_creates_what_sqlite_and_artifacts_need(settings: Settings) -> None:
    settings.ensure_dirs()
    assert settings.artifacts_dir.is_dir()
    assert settings.data_dir.is_dir()
    assert settings.sqlite_path is not None and settings.sqlite_path.parent.is_dir()


def test_in_memory_sqlite_has_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBAM_NAS_DATABASE_URL", "sqlite://")
    assert Settings().sqlite_path is None


def test_data_roots_default_to_the_data_dir_and_split_on_the_path_separator(
    bare_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().allowed_data_roots == (Path(".cbam-nas/data"),)
    monkeypatch.setenv("CBAM_NAS_DATA_ROOTS", os.pathsep.join(["/srv/images", "~/data", ""]))
    assert Settings().allowed_data_roots == (Path("/srv/images"), Path("~/data").expanduser())
