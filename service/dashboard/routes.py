"""The dashboard's pages and static files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
# plotly.js changes only with the installed package: let the browser keep it for a day.
_VENDOR_CACHE = {"Cache-Control": "public, max-age=86400"}


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the ``plotly`` Python package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}; reinstall plotly")
    return path


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)


@router.get("/static/vendor/plotly.min.js")
def plotly_bundle() -> FileResponse:
    return FileResponse(plotly_js(), media_type="text/javascript", headers=_VENDOR_CACHE)


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
