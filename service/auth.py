"""API tokens: created once and shown once, stored as a hash, checked in constant time.

Each token has a scope (``service.scopes``): ``read`` sees everything and changes nothing,
``write`` also submits and cancels searches, ``admin`` also deletes searches and manages tokens.
``service.api.deps`` turns a scope too small into a 403.

A token reads ``cbn_<id>_<secret>``. The id finds the row (no secret-dependent lookup); the
SHA-256 of the secret is compared with the stored one by ``hmac.compare_digest``. A plain hash
is enough here (no slow KDF): the secret is 256 random bits, not a password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from search.errors import InvalidValue
from search.store.engine import Database
from search.store.models import ApiToken, utcnow
from service.scopes import DEFAULT_SCOPE, check_scope

PREFIX = "cbn"
# Ids fit a 32-bit integer column: longer digit strings are not tokens (and never reach SQL).
_TOKEN = re.compile(rf"^{PREFIX}_(\d{{1,9}})_([A-Za-z0-9_-]{{20,}})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
# last_used_at is refreshed at most this often, so reads do not each write to the database.
_TOUCH_EVERY = timedelta(minutes=1)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(db: Database, name: str, scope: str = DEFAULT_SCOPE) -> str:
    """Store a new token named ``name`` with ``scope`` and return it; only its hash is kept."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidValue(
            "name", name, "1 to 100 letters, digits and _ . @ -, starting with a letter or digit"
        )
    scope = check_scope(scope)
    with db.session() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise InvalidValue("name", name, "a name no other token has")
        secret = secrets.token_urlsafe(32)
        row = ApiToken(name=name, token_hash=_digest(secret), scope=scope)
        session.add(row)
        session.flush()
        return f"{PREFIX}_{row.id}_{secret}"


def verify_token(db: Database, token: str) -> ApiToken | None:
    """The token's row if ``token`` is valid and not revoked, else None."""
    match = _TOKEN.match(token)
    if match is None:
        return None
    token_id, secret = int(match.group(1)), match.group(2)
    with db.session() as session:
        row = session.get(ApiToken, token_id)
    if row is None:
        # Compare anyway, so a wrong id takes as long as a wrong secret.
        hmac.compare_digest(_digest(secret), _digest(""))
        return None
    if not hmac.compare_digest(_digest(secret), row.token_hash) or row.revoked:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY:
        with db.session() as session:
            session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    return row


def revoke_token(db: Database, name: str) -> bool:
    """Revoke the token named ``name``; False if there is none."""
    with db.session() as session:
        result = session.execute(update(ApiToken).where(ApiToken.name == name).values(revoked=True))
        return result.rowcount == 1


def list_tokens(db: Database) -> list[ApiToken]:
    with db.session() as session:
        return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def read_token_file(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:  # missing or unreadable: no token, and the server will say 401
        return None
    return token or None


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, readable by its owner only (created with mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.replace(tmp, path)


def ensure_admin_token(db: Database, path: Path) -> tuple[str, bool]:
    """The admin token of the embedded default: the one in ``path`` if it is still valid and
    admin, else a new admin token written there. Returns the token and whether it was created
    now."""
    existing = read_token_file(path)
    row = verify_token(db, existing) if existing is not None else None
    if existing is not None and row is not None and row.scope == "admin":
        return existing, False
    names = {row.name for row in list_tokens(db)}
    name = "admin"
    suffix = 1
    while name in names:
        suffix += 1
        name = f"admin-{suffix}"
    token = create_token(db, name, scope="admin")
    write_token_file(path, token)
    return token, True
