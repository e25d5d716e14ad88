from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import IdempotencyKey, PageDep, PrincipalDep, SessionDep
from app.api.idempotent import create_once
from app.core.errors import Conflict
from app.core.storage import get_storage
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.schemas import EvaluationCreate, EvaluationList, EvaluationRead

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.post("", response_model=EvaluationRead)
def create_evaluation(body: EvaluationCreate, session: SessionDep, principal: PrincipalDep,
                      idempotency_key: IdempotencyKey = None) -> EvaluationRead:
    """Generate completions with a model (or take the team's completions_file) and run every program
    in the sandbox; pass@k per k. Runs on the evaluation workers; poll GET /v1/evaluations/{id}."""
    row, _ = create_once(
        session, principal, endpoint="evaluations", key=idempotency_key,
        create=lambda: evaluations.create(session, team_id=principal.team_id, body=body),
        fetch=lambda evaluation_id: evaluations.get(session, team_id=principal.team_id, evaluation_id=evaluation_id))
    return evaluations.to_read(row)


@router.get("", response_model=EvaluationList)
def list_evaluations(session: SessionDep, principal: PrincipalDep, page: PageDep) -> EvaluationList:
    return evaluations.list_page(session, team_id=principal.team_id, after=page.after, limit=page.limit)


@router.get("/{evaluation_id}", response_model=EvaluationRead)
def get_evaluation(evaluation_id: str, session: SessionDep, principal: PrincipalDep) -> EvaluationRead:
    return evaluations.to_read(evaluations.get(session, team_id=principal.team_id, evaluation_id=evaluation_id))


@router.post("/{evaluation_id}/cancel", response_model=EvaluationRead)
def cancel_evaluation(evaluation_id: str, session: SessionDep, principal: PrincipalDep) -> EvaluationRead:
    """A queued evaluation ends cancelled at once; a running one is answered still running, and its
    worker stops at its next batch of completions or its next program and records it cancelled.
    409 once it has ended, and for a job's evaluation (cancel the job instead)."""
    return evaluations.to_read(evaluations.cancel(session, team_id=principal.team_id, evaluation_id=evaluation_id))


@router.get("/{evaluation_id}/results", response_class=StreamingResponse,
            responses={200: {"content": {"application/jsonl": {}}}})
def evaluation_results(evaluation_id: str, session: SessionDep, principal: PrincipalDep) -> StreamingResponse:
    """Per-sample results as JSONL: task_id, completion_id, completion (as the model wrote it), program
    (what ran), passed, outcome (passed | failed | timeout | sandbox_error), mode (strong | weak), detail."""
    row = evaluations.get(session, team_id=principal.team_id, evaluation_id=evaluation_id)
    if row.results_key is None:
        raise Conflict(f"Evaluation {evaluation_id} is {row.status}; results exist once it has succeeded.",
                       param="evaluation_id", code="results_not_ready")
    return StreamingResponse(get_storage().iter_bytes(row.results_key), media_type="application/jsonl")
