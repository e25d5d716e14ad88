from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import PrincipalDep, SessionDep
from app.domains.jobs import service as jobs
from app.domains.quotas import service as quotas
from app.domains.quotas.schemas import QuotaRead

router = APIRouter(prefix="/quotas", tags=["quotas"])


@router.get("", response_model=QuotaRead)
def get_quotas(session: SessionDep, principal: PrincipalDep) -> QuotaRead:
    """The team's limits and current usage. Operators change limits with `tuneforge admin set-quota`."""
    return quotas.read(session, team_id=principal.team_id, jobs=jobs.counts(principal.team_id))
