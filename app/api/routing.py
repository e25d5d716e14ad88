"""The route a request matched, as a template: what the audit log and the metrics label requests by
(never the raw path, whose ids would make every request a label of its own)."""

from __future__ import annotations

from starlette.types import Scope


def template(scope: Scope) -> str | None:
    """The matched route's full template ("/v1/files/{file_id}"), None before routing or when no route
    matched. The route in the scope knows only its path below the routers' prefixes; the prefix is what
    precedes it in the request's path."""
    relative = getattr(scope.get("route"), "path_format", None)
    if relative is None:
        return None
    rendered = relative
    for name, value in (scope.get("path_params") or {}).items():
        rendered = rendered.replace("{" + name + "}", str(value))
    path = scope["path"]
    return path[: len(path) - len(rendered)] + relative if path.endswith(rendered) else None
