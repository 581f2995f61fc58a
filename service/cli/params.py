"""Command-line values turned into the project's objects; a bad value becomes a
``typer.BadParameter`` that names the option (exit code 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from search.errors import InvalidValue

if TYPE_CHECKING:
    from search.store.engine import Database, Role


def bad_parameter(exc: InvalidValue, option: str | None = None) -> typer.BadParameter:
    """The project's validation error as typer's, shown against ``option``."""
    return typer.BadParameter(str(exc), param_hint=option)


def open_database(url: str | None, role: Role = "tool") -> Database:
    """The database at ``url`` (the settings' when None); a bad URL is a bad --database."""
    from search.store.engine import open_database as open_db

    try:
        return open_db(url, role=role)
    except InvalidValue as exc:
        raise bad_parameter(exc, "--database") from None
