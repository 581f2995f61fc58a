"""``cbam-nas token create|list|revoke``: the server's API tokens, straight in the database."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from search.errors import InvalidValue
from service.cli.params import bad_parameter, open_database
from service.scopes import DEFAULT_SCOPE, TOKEN_SCOPES, check_scope

token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", help="What the token is for, e.g. ci or alice."),
    scope: str = typer.Option(
        DEFAULT_SCOPE,
        "--scope",
        help=f"What it may do, one of {', '.join(TOKEN_SCOPES)}. read: see everything, change "
        "nothing; write: also submit and cancel searches; admin: also delete searches (what "
        "every token could do before scopes).",
    ),
    database: str | None = typer.Option(
        None, "--database", help="SQLAlchemy URL. Default: the settings' (CBAM_NAS_DATABASE_URL)."
    ),
) -> None:
    """Create a token and print it: it is shown this once (only its hash is stored)."""
    from service.auth import create_token

    try:  # before the database is opened: a bad value is the caller's mistake, not the server's
        check_scope(scope)
    except InvalidValue as exc:
        raise bad_parameter(exc, "--scope") from None
    db = open_database(database)
    db.migrate()
    try:
        token = create_token(db, name, scope=scope)
    except InvalidValue as exc:
        raise bad_parameter(exc, f"--{exc.field}") from None
    finally:
        db.close()
    typer.echo(token)


@token_app.command("list")
def token_list(
    database: str | None = typer.Option(None, "--database", help="SQLAlchemy URL."),
) -> None:
    """Tokens by name, with their scope and when they were created and last used (never the
    tokens)."""
    from service.auth import list_tokens

    db = open_database(database)
    db.migrate()
    table = Table("name", "scope", "created", "last used", "revoked")
    for row in list_tokens(db):
        last_used = row.last_used_at.isoformat(timespec="seconds") if row.last_used_at else "-"
        created = row.created_at.isoformat(timespec="seconds")
        table.add_row(row.name, row.scope, created, last_used, "yes" if row.revoked else "")
    db.close()
    Console().print(table)


@token_app.command("revoke")
def token_revoke(
    name: str = typer.Argument(..., help="The token's name."),
    database: str | None = typer.Option(None, "--database", help="SQLAlchemy URL."),
) -> None:
    """Revoke a token: requests with it are refused from now on."""
    from service.auth import revoke_token

    db = open_database(database)
    db.migrate()
    found = revoke_token(db, name)
    db.close()
    if not found:
        raise typer.BadParameter(f"name: no token is named {name!r}", param_hint="NAME")
    typer.echo(f"revoked {name}")
