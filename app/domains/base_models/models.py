from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class RegisteredModel(Base):
    """A base model an operator registered from a local directory. path: that directory, or
    "storage:<prefix>" for one copied into blob storage (base_models.service.STORED)."""

    __tablename__ = "base_model"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    architecture: Mapped[str] = mapped_column(String(64))
    # Positions the model was trained for (config.json's max_position_embeddings); None: not stated.
    context_length: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
