"""API token scopes: the names, their order and the one check of a name.

Dependency-free (the CLI reads the names for its help at startup, before any database module is
imported); ``service.auth`` stores them and ``service.api.deps`` enforces them.
"""

from __future__ import annotations

from search.errors import InvalidValue

TOKEN_SCOPES: tuple[str, ...] = ("read", "write", "admin")
"""Least first; each scope includes the ones before it. ``read`` sees everything and changes
nothing, ``write`` also submits and cancels searches, ``admin`` also deletes searches and manages
tokens."""

# A new token's scope when none is named: admin, what every token was before scopes (and what
# the tokens stored then became), so that a script making its token with
# `cbam-nas token create --name ci` keeps every right it had. A narrower token is one --scope away.
DEFAULT_SCOPE = "admin"


def check_scope(scope: object) -> str:
    """``scope`` if it names a scope, else InvalidValue naming the field and the scopes."""
    if not isinstance(scope, str) or scope not in TOKEN_SCOPES:
        raise InvalidValue("scope", scope, TOKEN_SCOPES)
    return scope


def scope_allows(scope: str, required: str) -> bool:
    """Whether a token of ``scope`` may do what needs ``required``. A scope this version does not
    know (a row written by a newer one) allows nothing."""
    if scope not in TOKEN_SCOPES:
        return False
    return TOKEN_SCOPES.index(scope) >= TOKEN_SCOPES.index(check_scope(required))
