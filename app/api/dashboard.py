"""The dashboard page (`/dashboard`): plain static files, no build step.

The page and its assets need no key: they hold no data. The page's script asks
the viewer for an API key (kept in the tab's sessionStorage) and reads only the
public API (`/v1/analyses...`) with `Authorization: Bearer <key>`; on a server
with authentication disabled it works without one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.problems import Problem

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"

# Only these files are served: nothing else under the folder is reachable.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "chart.umd.js": "text/javascript; charset=utf-8",
    "chart.js.LICENSE.md": "text/plain; charset=utf-8",
}

# Everything the page loads comes from this server; the API is same-origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/dashboard")
def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/dashboard/")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard/assets/{name}")
def dashboard_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    path = STATIC_DIR / name
    if media_type is None or not path.is_file():
        raise Problem(404, f"No dashboard asset {name!r}.")
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)
