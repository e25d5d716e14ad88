"""The API's /v1 routes, read from the app itself so a new route cannot escape the route-walking tests."""

from __future__ import annotations

from fastapi.routing import APIRoute

from app.main import create_app


def v1_routes() -> list[tuple[str, str]]:
    out = []
    for route in create_app().routes:
        if isinstance(route, APIRoute) and route.path.startswith("/v1"):
            out += [(m, route.path) for m in sorted(route.methods)]
    return out
