"""Cursor pagination over time-sortable ids, newest first (OpenAI's after/limit/has_more)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session


def paginate(session: Session, stmt: Select, id_col: InstrumentedAttribute, *, after: str | None,
             limit: int) -> tuple[list[Any], bool]:
    """Return (items, has_more): at most `limit` rows older than `after`, newest first."""
    if after:
        stmt = stmt.where(id_col < after)
    rows = list(session.scalars(stmt.order_by(id_col.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
