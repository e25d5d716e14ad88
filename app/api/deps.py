"""Request dependencies: a session per request, the calling team, pagination."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.api.concurrency import admit_team
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.strict_json import NUL_FREE_PATTERN
from app.domains.quotas import ratelimit
from app.domains.quotas import service as quotas
from app.domains.quotas.errors import RateLimited, TooManyFailedAuthentications
from app.domains.teams import service as teams
from app.domains.teams.errors import AdminRequired, InvalidApiKey
from app.domains.teams.service import Principal


def _session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# scope="function": commit before the response is sent, so a failed commit cannot answer 200.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
T = TypeVar("T")


async def in_unit_of_work(work: Callable[[Session], T]) -> T:
    """Run work(session) in a session of its own, committed when it returns (rolled back when it
    raises), on the threadpool: for async routes that must commit before they answer, or that read
    repeatedly without holding one transaction open."""
    def run() -> T:
        with session_scope() as session:
            return work(session)

    return await run_in_threadpool(run)


def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The key's team, looked up in a short session of its own: a request holds a connection only
    while a query of its own runs, never while it waits for a body, a worker or a client. Takes the
    team's in-flight slot (app.api.concurrency). Raises InvalidApiKey (401), or past the client
    address's failed-authentication limit TooManyFailedAuthentications (429)."""
    key = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else None
        if key is None:
            key = ""
    try:
        with session_scope() as session:
            principal = teams.authenticate(session, key)
            # For rate_limit, in the same short session rather than a second one per request.
            request.state.limits = quotas.limits(session, principal.team_id)
    except InvalidApiKey:
        _count_failed_authentication(request)
        raise
    request.state.principal = principal  # for the audit log (app.api.audit)
    admit_team(request.scope.setdefault("state", {}), principal.team_id)
    return principal


def _count_failed_authentication(request: Request) -> None:
    """One failure of the client address's bucket; past it 429 instead of 401, so guessing keys is slow."""
    limits = get_settings().rate_limit
    address = request.client.host if request.client else "unknown"
    wait = ratelimit.buckets().take(f"auth-failures:{address}", rate=limits.failed_auth_per_second,
                                    burst=limits.failed_auth_burst)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise TooManyFailedAuthentications(
            f"Too many failed authentications from this address: {limits.failed_auth_burst} at once, then "
            f"{limits.failed_auth_per_second:g} per second. Check the API key; retry after {retry} s.",
            retry_after=retry)


PrincipalDep = Annotated[Principal, Depends(_principal)]


def _admin(principal: PrincipalDep) -> Principal:
    """403 for member keys: managing keys and reading the audit log take an admin key."""
    if not principal.is_admin:
        raise AdminRequired("This route needs an admin key, and this key's role is 'member'. "
                            "An admin of your team can do it, or give you an admin key.")
    return principal


AdminDep = Annotated[Principal, Depends(_admin)]
# openapi_extra of every route taking AdminDep: the docs (and the route-walking tests) read it.
ADMIN_ONLY = {"x-tuneforge-role": "admin"}


def rate_limit(request: Request, principal: PrincipalDep) -> None:
    """The per-key token bucket, a dependency of every /v1 route (app.main). Raises RateLimited (429,
    with Retry-After). Limits: the team's overrides, else TUNEFORGE_RATE_LIMIT__*, read by _principal
    in its session."""
    quota = request.state.limits
    wait = ratelimit.buckets().take(principal.key_id, rate=quota.rate_per_second, burst=quota.rate_burst)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise RateLimited(f"Rate limit exceeded for this key: {quota.rate_burst} requests at once, then "
                          f"{quota.rate_per_second:g} per second. Retry after {retry} s.", retry_after=retry)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


class Page:
    # after's NUL is refused at the door (app/api/request_checks.py), before the list's owner is looked
    # up: the pattern says so, so that another team's job (or webhook) answers 404 to whatever fits the schema.
    def __init__(self, after: Annotated[str | None, Query(max_length=64, pattern=NUL_FREE_PATTERN)] = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> None:
        self.after = after
        self.limit = limit


PageDep = Annotated[Page, Depends(Page)]
