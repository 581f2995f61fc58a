"""A small synchronous client of the REST API, for the CLI's client commands and for scripts.

    client = ApiClient()                       # settings' api_url and token (else the token file)
    search = client.submit(spec_dict)          # -> the search as the API returns it
    client.search(search["id"])["progress"]
    client.download(search["id"], 3, "weights.safetensors", Path("out/weights.safetensors"))

Every method returns the API's JSON as plain dicts and lists. A 4xx or 5xx answer raises
:class:`ApiError` with the status and a readable message made from the server's ``detail``; no
answer at all raises :class:`ApiUnreachable`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

API_PREFIX = "/api/v1"
_CHUNK = 1 << 20
# Longest reply read when a server answers with something that is not our JSON.
_TEXT_LIMIT = 500


class ApiError(Exception):
    """The server answered with an error status; ``message`` is its ``detail``, readable."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


class ApiUnreachable(Exception):
    """No server answered at ``url`` (refused, unresolvable, or no answer in time)."""

    def __init__(self, url: str, reason: str = "") -> None:
        self.url = url
        self.message = (
            f"no server answers at {url}"
            + (f" ({reason})" if reason else "")
            + ": start one with `cbam-nas serve`, or point --url (CBAM_NAS_API_URL) at one"
        )
        super().__init__(self.message)


def error_message(detail: Any) -> str:
    """The server's ``detail`` as text: a string as is; a list of validation errors (ours carry
    ``field`` and a message naming it; FastAPI's own name the place in ``loc``) one per line."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        lines = []
        for item in detail:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            msg = str(item.get("msg", item))
            loc = [str(part) for part in item.get("loc") or () if part not in ("body", "query")]
            if "field" not in item and loc:
                msg = f"{'.'.join(loc)}: {msg}"
            lines.append(msg)
        return "\n".join(lines)
    return json.dumps(detail)


def _response_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:_TEXT_LIMIT]
        return text or response.reason_phrase or f"HTTP {response.status_code}"
    if isinstance(body, dict) and "detail" in body:
        return error_message(body["detail"])
    return json.dumps(body)[:_TEXT_LIMIT]


def _settings_token() -> str | None:
    from search.settings import get_settings
    from service.auth import read_token_file

    settings = get_settings()
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value()
    try:
        return read_token_file(settings.token_file)
    except OSError:  # unreadable (another user's 0600 file): go without; the server says 401
        return None


class ApiClient:
    """The API at ``base_url`` (default: the settings' ``api_url``), called with ``token``
    (default: the settings' ``token``, i.e. CBAM_NAS_TOKEN, else the token file's)."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, timeout: float = 30
    ) -> None:
        if base_url is None:
            from search.settings import get_settings

            base_url = get_settings().api_url
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url: {base_url!r} is not allowed; allowed: an http(s):// URL")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith(API_PREFIX):
            self.base_url = self.base_url[: -len(API_PREFIX)]
        self.timeout = timeout
        token = token or _settings_token()
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX, headers=headers, timeout=timeout
        )
        self.last_status: int | None = None  # the status of the last answer, e.g. 201 or 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        params = kwargs.pop("params", None)
        if params is not None:
            kwargs["params"] = {k: v for k, v in params.items() if v is not None}
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiUnreachable(self.base_url, f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(self.base_url, type(exc).__name__) from None
        self.last_status = response.status_code
        if response.is_error:
            raise ApiError(response.status_code, _response_message(response))
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    @staticmethod
    def _id(value: str | int) -> str:
        return quote(str(value), safe="")

    def _search_path(self, search_id: str) -> str:
        return f"/searches/{self._id(search_id)}"

    # -- searches ---------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Create a search from a SearchSpec mapping. With ``idempotency_key``, a repeat returns
        the search the first call created (``last_status`` 200 instead of 201)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/searches", json=spec, headers=headers)

    def searches(
        self, state: str | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """A page of searches, newest first: ``{total, offset, limit, items}``."""
        params = {"state": state, "limit": limit, "offset": offset}
        return self._json("GET", "/searches", params=params)

    def search(self, search_id: str) -> dict[str, Any]:
        """A search with its ``progress``."""
        return self._json("GET", self._search_path(search_id))

    def cancel(self, search_id: str) -> dict[str, Any]:
        return self._json("POST", self._search_path(search_id) + "/cancel")

    def delete(self, search_id: str) -> None:
        self._request("DELETE", self._search_path(search_id))

    # -- trials -----------------------------------------------------------------------------

    def trials(
        self,
        search_id: str,
        sort: str = "number",
        order: str = "asc",
        limit: int = 50,
        offset: int = 0,
        state: str | None = None,
    ) -> dict[str, Any]:
        params = {"sort": sort, "order": order, "limit": limit, "offset": offset, "state": state}
        return self._json("GET", self._search_path(search_id) + "/trials", params=params)

    def trial(self, search_id: str, number: int, attempt: int | None = None) -> dict[str, Any]:
        path = f"{self._search_path(search_id)}/trials/{int(number)}"
        return self._json("GET", path, params={"attempt": attempt})

    def leaderboard(
        self,
        search_id: str,
        overhead: str = "params",
        limit: int = 20,
        offset: int = 0,
        pareto_only: bool = False,
        sort: str | None = None,
        order: str | None = None,
    ) -> dict[str, Any]:
        """A page of the ranking (``{search_id, overhead, total, offset, limit, references,
        entries}``), in rank order unless ``sort`` names another column (``order`` asc/desc)."""
        params: dict[str, Any] = {"overhead": overhead, "limit": limit, "offset": offset}
        params.update(sort=sort, order=order)
        if pareto_only:
            params["pareto_only"] = "true"
        return self._json("GET", self._search_path(search_id) + "/leaderboard", params=params)

    def best(
        self, search_id: str, overhead: str = "params", max_pct: float | None = None
    ) -> dict[str, Any]:
        params = {"overhead": overhead, "max_pct": max_pct}
        return self._json("GET", self._search_path(search_id) + "/best", params=params)

    def download(self, search_id: str, number: int, name: str, dest_path: Path | str) -> Path:
        """Stream a trial's file (``weights.safetensors``, ``architecture.json``,
        ``metrics.json``, ``model.json``, ``model.onnx``) to ``dest_path``; the file appears
        whole or not at all."""
        path = f"{self._search_path(search_id)}/trials/{int(number)}/files/{self._id(name)}"
        return self._stream(path, Path(dest_path))

    def download_bundle(
        self,
        search_id: str,
        dest_path: Path | str,
        number: int | None = None,
        overhead: str = "params",
        onnx: bool = False,
    ) -> Path:
        """Stream the model bundle (a zip: search.bundle) of trial ``number``, or of the
        search's answer when None, to ``dest_path``."""
        if number is None:
            path = f"{self._search_path(search_id)}/best/bundle"
            params: dict[str, Any] = {"overhead": overhead}
        else:
            path = f"{self._search_path(search_id)}/trials/{int(number)}/bundle"
            params = {}
        if onnx:
            params["onnx"] = "true"
        return self._stream(path, Path(dest_path), params)

    def _stream(self, path: str, dest: Path, params: dict[str, Any] | None = None) -> Path:
        """GET ``path`` into ``dest`` through a temporary file. The read timeout is longer
        here: the server makes ``model.onnx`` on first request."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 300.0))
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                self.last_status = response.status_code
                if response.is_error:
                    response.read()
                    raise ApiError(response.status_code, _response_message(response))
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in response.iter_bytes(_CHUNK):
                            out.write(chunk)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except httpx.TimeoutException:
            raise ApiUnreachable(self.base_url, "no answer in time") from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(self.base_url, type(exc).__name__) from None
        return dest
