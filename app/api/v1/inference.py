"""Operators' view of the inference processes: each live one with its engine's counters (loaded
adapters, cache hits / misses / evictions, queue depth, batches, tokens/s, requests per adapter).

An admin key sees the engine-wide counters and, per adapter, only its own team's adapters: the ids
of other teams' adapters stay hidden, as everywhere else."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api import forward
from app.api.deps import ADMIN_ONLY, AdminDep, in_unit_of_work
from app.core.db import unix
from app.domains.adapters import service as adapters
from app.domains.serving import service as serving
from app.domains.serving.protocol import BASE_ADAPTER_KEY

router = APIRouter(prefix="/inference", tags=["inference"])


class EndpointStats(BaseModel):
    id: str
    object: str = "inference.endpoint"
    base_model: str
    url: str
    started_at: int
    heartbeat_at: int
    stats: dict | None = None
    error: str | None = None  # why stats is missing: the process did not answer


class EndpointStatsList(BaseModel):
    object: str = "list"
    data: list[EndpointStats]


@router.get("/stats", response_model=EndpointStatsList, openapi_extra=ADMIN_ONLY)
async def inference_stats(principal: AdminDep) -> EndpointStatsList:
    """Counters of every inference process with a fresh heartbeat (admin keys only)."""
    def read(session: Session) -> tuple[list, set[str]]:
        # Read in a short transaction: no connection is held while the processes are asked.
        return serving.live(session), {a.id for a in adapters.list_all(session, team_id=principal.team_id)}

    endpoints, own = await in_unit_of_work(read)
    rows = [EndpointStats(id=e.id, base_model=e.base_model, url=e.url, started_at=unix(e.started_at),
                          heartbeat_at=unix(e.heartbeat_at)) for e in endpoints]
    for row, answer in zip(rows, await forward.stats([r.url for r in rows]), strict=True):
        if isinstance(answer, dict):
            row.stats = _team_view(answer, own)
        else:
            row.error = answer
    return EndpointStatsList(data=rows)


def _team_view(stats: dict, own: set[str]) -> dict:
    """The engine's counters with the per-adapter parts cut to the team's own adapters (and the base),
    and without filesystem paths: neither the adapters' nor the base model's."""
    loaded = [{k: v for k, v in e.items() if k != "path"} for e in stats.get("adapters_loaded", []) if e["id"] in own]
    requests = {k: v for k, v in stats.get("per_adapter_requests", {}).items() if k in own or k == BASE_ADAPTER_KEY}
    view = stats | {"adapters_loaded": loaded, "per_adapter_requests": requests}
    if isinstance(stats.get("base"), dict):
        view["base"] = {k: v for k, v in stats["base"].items() if k != "path"}
    return view
