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


def _all(session, team_id: str) -> list[ModelRead]:
    live = serving.serving_bases(session)
    out = [ModelRead(id=m.id, created=unix(m.created_at), owned_by="tuneforge", kind="base", serving=m.id in live)
           for m in base_models.list_base(session)]
    out += [ModelRead(id=a.name, created=unix(a.created_at), owned_by=team_id, kind="fine-tuned",
                      base_model=a.base_model, adapter_id=a.id, serving=a.base_model in live)
            for a in adapters.list_all(session, team_id=team_id)]
    return out


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, principal: PrincipalDep) -> ModelList:
    """The registered base models and the team's fine-tuned models; `serving` tells which answer completions
    now (an inference process serves their base)."""
    return ModelList(data=_all(session, principal.team_id))


@router.get("/{model_id:path}", response_model=ModelRead)
def get_model(model_id: str, session: SessionDep, principal: PrincipalDep) -> ModelRead:
    """A base model, one of the team's fine-tuned models, or one of its jobs' checkpoints by the
    `fine_tuned_model_checkpoint` name that the job's checkpoints list shows."""
    for m in _all(session, principal.team_id):
        if m.id == model_id:
            return m
    found = checkpoints.get_by_model_name(session, team_id=principal.team_id, name=model_id)
    if found is not None:
        checkpoint, base_model = found
        return ModelRead(id=model_id, created=unix(checkpoint.created_at), owned_by=principal.team_id,
                         kind="checkpoint", base_model=base_model,
                         serving=base_model in serving.serving_bases(session))
    raise ModelNotFound(f"No such model: {model_id!r}.", param="model")


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, session: SessionDep, principal: PrincipalDep) -> ModelDeleted:
    """Deletes a fine-tuned model (its adapter) and its job's checkpoint models. Base models are removed by the
    operator."""
    serving.delete_fine_tuned(session, team_id=principal.team_id, model=model_id)
    return ModelDeleted(id=model_id)
