"""The layout's rules hold: import-linter's contracts (``make lint``) pass on the tree and fail on
an import that breaks one; no module grows past what a reader can hold; the GPU checks need
neither the database nor the service."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("search", "workers", "service")
MAX_LINES = 600  # the C++ kernels aside


# What a GPU box has not (its python has torch, timm, pytest and, from `make gpu-wheels`,
# pydantic and pydantic-settings): the database's, the study's and the service's packages.
NOT_ON_THE_GPU_BOX = (
    "sqlalchemy",
    "alembic",
    "psycopg",
    "optuna",
    "fastapi",
    "starlette",
    "uvicorn",
)
BLOCKER = f"""
import importlib.abc, sys

class _NotHere(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in {set(NOT_ON_THE_GPU_BOX)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU box)")

sys.meta_path.insert(0, _NotHere())
"""


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    return subprocess.run(
        command,
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(ROOT / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.cpp")
        )
    return root


def test_the_tree_keeps_every_import_contract() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("search/knobs.py", "import workers.worker", "service -> workers -> search"),
        ("search/nn/gates.py", "import search.space", "nn at the bottom"),
        ("service/api/routes/meta.py", "import workers.queue", "only to launch them"),
        ("search/study/samplers.py", "import search.study.studies", "No import cycles"),
    ],
)
def test_an_import_against_a_contract_fails_the_lint(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    root = _copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = _lint_imports(root)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and contract in result.stdout, result.stdout


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


@pytest.mark.e2e
def test_the_gpu_checks_run_without_the_database_or_the_service(tmp_path: Path) -> None:
    """The device check (``benchmarks/gpu.py``) and tests/test_gpu.py, as the GPU box runs them
    (``--noconftest``: conftest.py opens databases), import nothing it lacks."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{tmp_path}:{ROOT}:{ROOT / 'tests'}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for command in (
        ["-c", "import sqlalchemy"],
        ["benchmarks/gpu.py", "--quick"],
        [
            "-m",
            "pytest",
            "--noconftest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_gpu.py",
        ],
    ):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if command[1] == "import sqlalchemy":  # the blocker works
            assert result.returncode == 1 and "not on the GPU box" in result.stderr
        else:
            assert result.returncode == 0, result.stdout + result.stderr
    assert "tests collected" in result.stdout and "error" not in result.stdout.lower()
