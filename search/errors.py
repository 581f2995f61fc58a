"""The one error type for bad values anywhere in the domain."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class InvalidValue(ValueError):
    """A value outside what a field allows; the message names the field and the allowed values.

    ``field`` is a dotted path (``space.kernel_sizes[1]``) so that the service can map it onto
    the request body and a CLI can print it as is.
    """

    def __init__(self, field: str, value: Any, allowed: str | Iterable[Any]) -> None:
        if not isinstance(allowed, str):
            allowed = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: {value!r} is not allowed; allowed: {allowed}")


class NotFound(LookupError):
    """No such search, trial or artifact; ``what`` names it (``search 1f3c...``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} not found")


class Conflict(RuntimeError):
    """A change the current state does not allow (cancelling a finished search, deleting a
    running one); the message says what the state is and what would be needed."""
