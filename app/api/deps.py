"""Request dependencies: a session per request, the calling team, pagination."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.domains.teams import service as teams
from app.domains.teams.service import Principal


def _session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# scope="function": commit before the response is sent, so a failed commit cannot answer 200.
SessionDep = Annotated[Session, Depends(_session, scope="function")]


def _principal(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    key = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else None
        if key is None:
            key = ""
    return teams.authenticate(session, key)


PrincipalDep = Annotated[Principal, Depends(_principal)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


class Page:
    def __init__(self, after: Annotated[str | None, Query(max_length=64)] = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> None:
        self.after = after
        self.limit = limit


PageDep = Annotated[Page, Depends(Page)]
