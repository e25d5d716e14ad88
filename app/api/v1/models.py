from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from app.api.deps import PrincipalDep, SessionDep
from app.core.db import unix
from app.domains.adapters import service as adapters
from app.domains.base_models import service as base_models
from app.domains.base_models.errors import ModelNotFound
from app.domains.checkpoints import service as checkpoints
from app.domains.checkpoints.models import FineTuningCheckpoint
from app.domains.serving import service as serving

router = APIRouter(prefix="/models", tags=["models"])


class ModelRead(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "fine-tuned", "checkpoint"]
    base_model: str | None = None
    adapter_id: str | None = None
    serving: bool = False  # an inference process serves it now: completions with this model work


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelRead]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


def _bases_and_fine_tuned(session, team_id: str, live: set[str]) -> list[ModelRead]:
    out = [ModelRead(id=m.id, created=unix(m.created_at), owned_by="tuneforge", kind="base", serving=m.id in live)
           for m in base_models.list_base(session)]
    out += [ModelRead(id=a.name, created=unix(a.created_at), owned_by=team_id, kind="fine-tuned",
                      base_model=a.base_model, adapter_id=a.id, serving=a.base_model in live)
            for a in adapters.list_all(session, team_id=team_id)]
    return out


def _checkpoint(name: str, checkpoint: FineTuningCheckpoint, base_model: str, team_id: str,
                live: set[str]) -> ModelRead:
    return ModelRead(id=name, created=unix(checkpoint.created_at), owned_by=team_id, kind="checkpoint",
                     base_model=base_model, serving=base_model in live)


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, principal: PrincipalDep) -> ModelList:
    """The registered base models, the team's fine-tuned models and its jobs' checkpoints (each by the
    `fine_tuned_model_checkpoint` name its job's checkpoints list shows, `kind: "checkpoint"`); `serving` tells
    which answer completions now (an inference process serves their base)."""
    team_id, live = principal.team_id, serving.serving_bases(session)
    return ModelList(data=_bases_and_fine_tuned(session, team_id, live) + [
        _checkpoint(name, checkpoint, base_model, team_id, live)
        for name, checkpoint, base_model in checkpoints.list_models(session, team_id=team_id)])


@router.get("/{model_id:path}", response_model=ModelRead)
def get_model(model_id: str, session: SessionDep, principal: PrincipalDep) -> ModelRead:
    """A base model, one of the team's fine-tuned models, or one of its jobs' checkpoints by the
    `fine_tuned_model_checkpoint` name that the job's checkpoints list shows."""
    live = serving.serving_bases(session)
    for m in _bases_and_fine_tuned(session, principal.team_id, live):
        if m.id == model_id:
            return m
    found = checkpoints.get_by_model_name(session, team_id=principal.team_id, name=model_id)
    if found is not None:
        return _checkpoint(model_id, *found, principal.team_id, live)
    raise ModelNotFound(f"No such model: {model_id!r}.", param="model")


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, session: SessionDep, principal: PrincipalDep) -> ModelDeleted:
    """Deletes a fine-tuned model (its adapter) and its job's checkpoint models. Base models are removed by the
    operator."""
    serving.delete_fine_tuned(session, team_id=principal.team_id, model=model_id)
    return ModelDeleted(id=model_id)
