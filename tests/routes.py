"""The API's /v1 routes, read from the app's own OpenAPI schema so a new route cannot escape
the route-walking tests."""

from __future__ import annotations

from app.main import create_app

_METHODS = ("get", "post", "put", "patch", "delete")


def v1_routes() -> list[tuple[str, str]]:
    paths = create_app().openapi()["paths"]
    out = [(m.upper(), p) for p, ops in paths.items() if p.startswith("/v1/") for m in ops if m in _METHODS]
    # Fewer than this means routes are being missed, and every walk over them would pass vacuously.
    assert len(out) >= 14, out
    return out
