"""The web dashboard: static pages under /ui that call this API's own /v1 routes from the browser,
with the team's key held in the tab's sessionStorage. Nothing here reads the database or knows a
key; the pages see exactly what the key's team sees through /v1."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.staticfiles import PathLike
from starlette.types import Scope

STATIC = Path(__file__).resolve().parents[1] / "ui" / "static"
# The pages load nothing from elsewhere (no CDN: the dashboard works offline) and run no inline
# script, so a script injected through an API value (a job's metadata, an event message) cannot run.
# blob: is for the adapter download, which is fetched with the key and handed over as a blob URL.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           # Pages are small and change with each release: always revalidate, never a stale script.
           "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_without_slash() -> RedirectResponse:
    # The page's relative asset paths resolve under /ui/ only.
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


class _Assets(StaticFiles):
    """The dashboard's scripts and styles, with the page's security and caching headers."""

    def file_response(self, full_path: PathLike, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve the dashboard: / and /ui redirect to /ui/, its assets under /ui/static/."""
    app.include_router(router)
    app.mount("/ui/static", _Assets(directory=STATIC), name="ui-static")
