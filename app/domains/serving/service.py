"""Serving: which inference process serves which base model, and what a model name resolves to.

An inference process registers itself (base model, URL) and refreshes a heartbeat; the API reads
the table to find where to forward a completion. Works the same on SQLite (one machine) and
Postgres (separate containers), since the URL is whatever the process advertises."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.ids import new_id
from app.domains.adapters import service as adapters
from app.domains.adapters.errors import AdapterNotFound
from app.domains.adapters.models import Adapter
from app.domains.base_models import service as base_models
from app.domains.base_models.errors import ModelNotFound
from app.domains.checkpoints import service as checkpoints
from app.domains.checkpoints.models import FineTuningCheckpoint
from app.domains.serving.errors import ModelNotServing
from app.domains.serving.models import InferenceEndpoint

HEARTBEAT_SECONDS = 5.0  # how often a live inference process refreshes its row
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS + 5  # a row older than this is a dead process's


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: a base model alone, a team's adapter on its base, or one of the team's
    training checkpoints (its adapter at that step) on its job's base."""

    model: str
    base_model: str
    adapter: Adapter | None
    checkpoint: FineTuningCheckpoint | None = None

    @property
    def adapter_id(self) -> str | None:
        """What the inference process loads (adapter_files): the adapter's id or the checkpoint's; None for the base."""
        if self.checkpoint is not None:
            return self.checkpoint.id
        return self.adapter.id if self.adapter is not None else None


def register(session: Session, *, base_model: str, url: str) -> InferenceEndpoint:
    """Record (or take over) the row for `url`. Raises ModelNotFound when the base is not registered."""
    if base_models.get_base(session, base_model) is None:
        raise ModelNotFound(f"No base model named {base_model!r} is registered; register it with "
                            "`tuneforge models register NAME PATH`.", param="model")
    row = session.scalar(select(InferenceEndpoint).where(InferenceEndpoint.url == url))
    now = utcnow()
    if row is None:
        row = InferenceEndpoint(id=new_id("infsrv"), base_model=base_model, url=url, started_at=now,
                                heartbeat_at=now)
        session.add(row)
    else:
        row.base_model, row.started_at, row.heartbeat_at = base_model, now, now
    session.flush()
    return row


def heartbeat(session: Session, *, endpoint_id: str) -> bool:
    """Refresh the row; False when it is gone (e.g. the base model was deleted)."""
    row = session.get(InferenceEndpoint, endpoint_id)
    if row is None:
        return False
    row.heartbeat_at = utcnow()
    session.flush()
    return True


def unregister(session: Session, *, endpoint_id: str) -> None:
    session.execute(delete(InferenceEndpoint).where(InferenceEndpoint.id == endpoint_id))


def live(session: Session, *, base_model: str | None = None) -> list[InferenceEndpoint]:
    """Endpoints with a fresh heartbeat, the most recently refreshed first."""
    cutoff = utcnow() - dt.timedelta(seconds=STALE_AFTER_SECONDS)
    query = select(InferenceEndpoint).where(InferenceEndpoint.heartbeat_at >= cutoff)
    if base_model is not None:
        query = query.where(InferenceEndpoint.base_model == base_model)
    return list(session.scalars(query.order_by(InferenceEndpoint.heartbeat_at.desc())))


def serving_bases(session: Session) -> set[str]:
    return {e.base_model for e in live(session)}


def resolve(session: Session, *, team_id: str, model: str) -> Target:
    """The base model, the team's fine-tuned model or the team's checkpoint (`...:ckpt-step-N`) named `model`.
    Raises ModelNotFound for an unknown name and for another team's model, alike."""
    if base_models.get_base(session, model) is not None:
        return Target(model=model, base_model=model, adapter=None)
    adapter = adapters.get_by_name(session, team_id=team_id, name=model)
    if adapter is None and (found := checkpoints.get_by_model_name(session, team_id=team_id, name=model)):
        checkpoint, base_model = found
        return Target(model=model, base_model=base_model, adapter=None, checkpoint=checkpoint)
    if adapter is None:
        raise ModelNotFound(f"The model {model!r} does not exist or you do not have access to it.", param="model")
    return Target(model=model, base_model=adapter.base_model, adapter=adapter)


def endpoints_for(session: Session, *, base_model: str, key: str) -> list[InferenceEndpoint]:
    """The live endpoints serving `base_model`, in the order to try them for `key` (an adapter id,
    or the base's name). Rendezvous hashing: each key goes first to one process, the one whose
    adapter cache then holds it, while different keys spread over all processes; the others
    follow, in an order of their own, for when the first is unreachable. A process that comes or
    goes moves only the keys it wins or held. Raises ModelNotServing when there is none."""
    endpoints = live(session, base_model=base_model)
    if not endpoints:
        raise ModelNotServing(
            f"No inference process is serving base model {base_model!r}; start one with "
            f"`tuneforge inference --model {base_model}` (or `tuneforge up` on one machine).", param="model")
    return sorted(endpoints, key=lambda e: hashlib.sha256(f"{key}\0{e.id}".encode()).digest(), reverse=True)


def adapter_files(session: Session, *, team_id: str, adapter_id: str) -> tuple[str, str] | None:
    """(base model, storage prefix of the peft directory) of what a Route's adapter_id names: the team's adapter,
    or the team's checkpoint, whose directory holds the adapter at its step (adapter_config.json and
    adapter_model.safetensors, beside the optimizer state the engine does not read). None when the row is gone
    (deleted after the route was read) or is another team's."""
    try:
        row = adapters.get(session, team_id=team_id, adapter_id=adapter_id)
        return row.base_model, adapters.files_prefix(row.storage_prefix)
    except AdapterNotFound:
        pass
    found = checkpoints.get(session, team_id=team_id, checkpoint_id=adapter_id)
    if found is None:
        return None
    checkpoint, base_model = found
    return base_model, checkpoint.storage_prefix


def delete_fine_tuned(session: Session, *, team_id: str, model: str) -> None:
    """Delete the team's fine-tuned model: its adapter, and its job's checkpoints, whose model names answer 404
    from then on; their files are removed after commit. Raises ModelNotFound for an unknown name (a base model,
    a checkpoint's name, another team's model)."""
    row = adapters.get_by_name(session, team_id=team_id, name=model)
    if row is None:
        raise ModelNotFound(f"No such fine-tuned model: {model!r}.", param="model")
    adapters.delete(session, team_id=team_id, adapter_id=row.id)
    if row.job_id is not None:
        checkpoints.delete_for_job(session, job_id=row.job_id)


@dataclass(frozen=True)
class Route:
    """Where a request for a model goes: its base, the team's adapter (None for the base alone), and the
    URLs of the live processes serving the base, in the order to try them."""

    base_model: str
    adapter_id: str | None
    urls: list[str]


def route(session: Session, *, team_id: str, model: str) -> Route:
    """resolve() + endpoints_for(), keyed by the adapter (or the base alone). Raises ModelNotFound and
    ModelNotServing like them."""
    target = resolve(session, team_id=team_id, model=model)
    adapter_id = target.adapter_id
    endpoints = endpoints_for(session, base_model=target.base_model, key=adapter_id or target.base_model)
    return Route(base_model=target.base_model, adapter_id=adapter_id, urls=[e.url for e in endpoints])
