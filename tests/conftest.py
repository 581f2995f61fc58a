"""Shared fixtures: every test gets its own state directory, never the checkout's ./.cbam-nas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from search.settings import Settings, get_settings


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the whole run: datasets are read-only once prepared."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def settings(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Point the settings at a fresh SQLite file and artifact directory under tmp_path.

    Request it by name to read the values; a test that needs other values sets CBAM_NAS_*
    with monkeypatch and calls ``get_settings.cache_clear()``.
    """
    state = tmp_path / "cbam-nas"
    monkeypatch.setenv("CBAM_NAS_DATABASE_URL", f"sqlite:///{state / 'cbam-nas.db'}")
    monkeypatch.setenv("CBAM_NAS_ARTIFACTS_DIR", str(state / "artifacts"))
    monkeypatch.setenv("CBAM_NAS_DATA_DIR", str(shared_data_dir))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
