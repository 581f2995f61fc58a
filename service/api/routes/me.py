"""``/me``: who the caller is and what its token may do, so that a client (the dashboard) shows
only the controls the server would accept."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import Field

from search.store.models import ApiToken
from service.api.deps import read_access
from service.api.schemas import Out
from service.scopes import TOKEN_SCOPES, scope_allows

router = APIRouter(tags=["auth"])


class MeOut(Out):
    """The caller's token: its name and scope, and what that scope allows. Writes need the token
    in the Authorization header (the dashboard's cookie opens reads only)."""

    name: str | None = Field(description="The token's name; None: no token (reads are open).")
    scope: Literal[TOKEN_SCOPES] = Field(  # type: ignore[valid-type]
        description="read: see everything; write: also submit and cancel; admin: also delete."
    )
    can_write: bool = Field(description="May submit and cancel searches.")
    can_admin: bool = Field(description="May delete searches.")


@router.get("/me")
def me(caller: Annotated[ApiToken | None, Depends(read_access)]) -> MeOut:
    """The caller's token name and scope; without a token (the server opened reads) an
    anonymous, read-only answer."""
    if caller is None:
        return MeOut(name=None, scope="read", can_write=False, can_admin=False)
    return MeOut(
        name=caller.name,
        scope=caller.scope,
        can_write=scope_allows(caller.scope, "write"),
        can_admin=scope_allows(caller.scope, "admin"),
    )
