"""``cbam-nas token create|list|revoke``: scopes, and a bad value exits with code 2 naming its
option and the allowed values, with nothing stored."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from search.store.engine import Database
from service.auth import list_tokens, verify_token
from service.cli import app

runner = CliRunner()


def _cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _flat(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return " ".join(text.replace("│", " ").replace("┃", " ").split())


@pytest.mark.parametrize("scope", ["read", "write", "admin"])
def test_create_with_a_scope(sqlite_db: Database, scope: str) -> None:
    code, out, err = _cli("token", "create", "--name", f"ci-{scope}", "--scope", scope)
    assert code == 0, err
    row = verify_token(sqlite_db, out.strip())
    assert row is not None and (row.name, row.scope) == (f"ci-{scope}", scope)


def test_the_default_scope_is_admin(sqlite_db: Database) -> None:
    """What every token was before scopes, so that existing scripts keep their rights."""
    code, out, err = _cli("token", "create", "--name", "ci", "--database", sqlite_db.url)
    assert code == 0, err
    row = verify_token(sqlite_db, out.strip())
    assert row is not None and row.scope == "admin"


@pytest.mark.parametrize("scope", ["owner", "READ", ""])
def test_a_bad_scope_exits_2_naming_the_option_and_the_scopes(
    sqlite_db: Database, scope: str
) -> None:
    code, out, err = _cli("token", "create", "--name", "ci", "--scope", scope)
    assert code == 2, (out, err)
    message = _flat(err)
    assert "--scope" in message
    assert f"scope: {scope!r} is not allowed; allowed: 'read', 'write', 'admin'" in message
    assert out == "" and list_tokens(sqlite_db) == []


def test_a_bad_name_still_names_name(sqlite_db: Database) -> None:
    code, _, err = _cli("token", "create", "--name", "no spaces", "--scope", "read")
    assert code == 2 and "--name" in _flat(err)
    assert list_tokens(sqlite_db) == []


def test_list_shows_each_scope(sqlite_db: Database) -> None:
    for name, scope in (("alice", "read"), ("ci", "write"), ("root", "admin")):
        assert _cli("token", "create", "--name", name, "--scope", scope)[0] == 0
    assert _cli("token", "revoke", "ci")[0] == 0
    code, out, err = _cli("token", "list")
    assert code == 0, err
    text = _flat(out)
    assert "name scope created last used revoked" in text
    assert " alice read " in f" {text} " and " root admin " in f" {text} "
    assert " ci write " in f" {text} " and "yes" in text
