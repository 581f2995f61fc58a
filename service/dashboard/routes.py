"""The dashboard's pages and static files."""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
# plotly.js changes only with the installed package: let the browser keep it for a day.
_VENDOR_HEADERS = {"Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"}


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the ``plotly`` Python package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}; reinstall plotly")
    return path


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)


@cache
def _plotly_bytes(compressed: bool) -> bytes:
    """plotly.min.js (4.7 MB), or gzipped once per process (1.4 MB: a quarter of the transfer)."""
    raw = plotly_js().read_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compressed else raw


@router.get("/static/vendor/plotly.min.js")
def plotly_bundle(request: Request) -> Response:
    compressed = "gzip" in request.headers.get("accept-encoding", "")
    headers = dict(_VENDOR_HEADERS)
    if compressed:
        headers["Content-Encoding"] = "gzip"
    return Response(_plotly_bytes(compressed), media_type="text/javascript", headers=headers)


def _render(request: Request, page: str, **context: Any) -> HTMLResponse:
    """A page shell; ``read_open`` tells its script whether reads work without a token."""
    read_open = request.app.state.settings.read_open
    return templates.TemplateResponse(
        request, f"{page}.html", {"page": page, "read_open": read_open, **context}
    )


@router.get("/", response_class=HTMLResponse)
def searches_page(request: Request) -> HTMLResponse:
    return _render(request, "searches")


@router.get("/searches/{search_id}", response_class=HTMLResponse)
def search_page(request: Request, search_id: str) -> HTMLResponse:
    return _render(request, "search", search_id=search_id)


@router.get("/searches/{search_id}/trials/{number}", response_class=HTMLResponse)
def trial_page(request: Request, search_id: str, number: int) -> HTMLResponse:
    return _render(request, "trial", search_id=search_id, number=number)
