"""Input refused at the door, for every /v1 route at once (a dependency of the v1 router, app.main),
before any route reads or writes anything:

- a NUL (\\u0000) in a query parameter, a path parameter or anywhere in a JSON body, key or value:
  Postgres text cannot hold it, and a value stored on SQLite would break every later search for it;
- NaN, Infinity or an out-of-range number, or a key twice in one object, in a JSON body
  (app/core/strict_json.py);
- a query parameter the route does not take: nothing is accepted and then ignored. A route that
  takes a family of parameters (metadata[key]=value) declares it with a QueryFamily dependency,
  which validates each member.

Each answers 400 invalid_request_error naming the parameter, in OpenAI's dotted style.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.core import strict_json
from app.core.errors import InvalidRequest

_NUL = "\x00"


def _shown(name: str) -> str:
    return name.replace(_NUL, "\\u0000")


class QueryFamily:
    """A dependency for query parameters named prefix[key]: returns {key: value}. Raises InvalidRequest
    (400) for a parameter of the family whose key fails `key_problem` (a message, or None when fine)
    or that is given twice."""

    def __init__(self, prefix: str, key_problem: Callable[[str], str | None]) -> None:
        self.prefix = prefix
        self.key_problem = key_problem
        self._pattern = re.compile(rf"^{re.escape(prefix)}\[(.*)\]$", re.DOTALL)

    def owns(self, name: str) -> bool:
        return name.startswith(f"{self.prefix}[")

    def __call__(self, request: Request) -> dict[str, str]:
        found: dict[str, str] = {}
        for name, value in request.query_params.multi_items():
            if not self.owns(name):
                continue
            match = self._pattern.match(name)
            if match is None:
                problem: str | None = f"write it as {self.prefix}[key]=value"
            elif match[1] in found:
                problem = "give each key once"
            else:
                problem = self.key_problem(match[1])
            if match is None or problem is not None:
                raise InvalidRequest(f"Invalid filter '{_shown(name)}': {problem}.", param=_shown(name),
                                     code="invalid_filter")
            found[match[1]] = value
        return found


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def _accepted(route: APIRoute) -> tuple[set[str], list[QueryFamily]]:
    names: set[str] = set()
    families: list[QueryFamily] = []
    for dependant in _dependants(route.dependant):
        names.update(field.alias for field in dependant.query_params)
        if isinstance(dependant.call, QueryFamily):
            families.append(dependant.call)
    return names, families


def _is_json(request: Request) -> bool:
    # No Content-Type counts: FastAPI reads such a body as JSON too.
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type in ("", "application/json") or media_type.endswith("+json")


async def refuse_bad_input(request: Request) -> None:
    """Raises InvalidRequest (400) for the inputs in this module's docstring; reads nothing else."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and _NUL in value:
            raise InvalidRequest(f"The path parameter '{name}' contains a NUL (\\u0000) character; remove it.",
                                 param=name, code="invalid_value")
    route = request.scope.get("route")
    names, families = _accepted(route) if isinstance(route, APIRoute) else (set(), [])
    for name, value in request.query_params.multi_items():
        if _NUL in name or _NUL in value:
            raise InvalidRequest(f"The query parameter '{_shown(name)}' contains a NUL (\\u0000) character; "
                                 "remove it.", param=_shown(name), code="invalid_value")
        if isinstance(route, APIRoute) and name not in names and not any(f.owns(name) for f in families):
            takes = ", ".join(sorted(names | {f"{f.prefix}[key]" for f in families})) or "none"
            raise InvalidRequest(f"Unknown query parameter '{name}' for this route (it takes: {takes}).",
                                 param=name, code="unknown_parameter")
    if not _is_json(request):
        return
    body = await request.body()
    if not body.strip():
        return
    try:
        value = strict_json.loads(body)
    except strict_json.StrictJsonError as exc:
        raise InvalidRequest(f"Invalid JSON body: {exc}.", param=strict_json.dotted(exc.path) or None,
                             code="invalid_value") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return  # malformed JSON: the route's own body parsing answers it, with the position
    path = strict_json.first_nul(value)
    if path is not None:
        param = strict_json.dotted(path) or None
        raise InvalidRequest(f"'{param or 'body'}' contains a NUL (\\u0000) character, which cannot be stored; "
                             "remove it.", param=param, code="invalid_value")
