"""Cursor pagination over time-sortable ids (OpenAI's after/limit/has_more): newest first by
default, oldest first with order "asc"."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

Order = Literal["asc", "desc"]


def paginate(session: Session, stmt: Select, id_col: InstrumentedAttribute, *, after: str | None,
             limit: int, order: Order = "desc") -> tuple[list[Any], bool]:
    """Return (items, has_more): at most `limit` rows past `after` in `order` ("desc": older than
    it, newest first; "asc": newer than it, oldest first)."""
    if after:
        stmt = stmt.where(id_col > after if order == "asc" else id_col < after)
    ordering = id_col.asc() if order == "asc" else id_col.desc()
    rows = list(session.scalars(stmt.order_by(ordering).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
