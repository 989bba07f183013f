"""The dashboard page, a static HTML and JavaScript client of the REST API at / and /dashboard.

The page and its assets need no API key because they contain no data. The page reads
everything through the ``/v1`` endpoints and sends the key that the user enters as a bearer
token.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.auth import public

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/")
@router.get("/dashboard")
@router.get("/dashboard/")  # a trailing slash is not redirected
@public
def read_dashboard() -> FileResponse:
    """Serve the dashboard page."""
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard routes to ``app`` and serve its assets under /static."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
