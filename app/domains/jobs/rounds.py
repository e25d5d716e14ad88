"""auto_iterate: a job's evaluation ends it, or records a round and starts the next one.

The job the user submitted is round 1 and stays evaluating while its loop runs; later rounds
are child jobs. After each round the policy (jobs.iteration) decides: stop (the parent succeeds,
reporting every round and the best) or train again with one setting changed. A round that
fails or is cancelled ends the loop.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.ids import new_id
from app.domains.adapters import service as adapters
from app.domains.jobs import iteration
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.spec import AutoIterateSpec, TrainingSpec
from app.domains.jobs.states import JobStatus, add_event, enqueue_after_commit, existing_job, transition


def _loop_parent(session: Session, job: FineTuningJob) -> FineTuningJob | None:
    if job.parent_job_id:
        return session.get(FineTuningJob, job.parent_job_id)
    return job if TrainingSpec.model_validate(job.spec).auto_iterate else None


def _policy(parent: FineTuningJob) -> AutoIterateSpec:
    policy = TrainingSpec.model_validate(parent.spec).auto_iterate
    if policy is None:  # a loop's parent is the job submitted with auto_iterate; its children have none
        raise ValueError(f"job {parent.id!r} is not the parent of an auto_iterate loop")
    return policy


def rounds_of(session: Session, parent: FineTuningJob) -> list[iteration.RoundResult]:
    """Round 1 (the parent) and its child rounds, in order, each with its target metric."""
    metric = _policy(parent).target.metric
    jobs_ = [parent, *session.scalars(select(FineTuningJob).where(FineTuningJob.parent_job_id == parent.id)
                                      .order_by(FineTuningJob.round))]
    return [iteration.RoundResult(round=j.round or 1, job_id=j.id,
                                  score=iteration.metric_of((j.usage or {}).get("evaluation") or {}, metric)
                                  if j.status in (JobStatus.SUCCEEDED, JobStatus.EVALUATING) else None)
            for j in jobs_]


def finish_evaluation(session: Session, *, job_id: str, evaluation: dict) -> bool:
    """evaluating -> succeeded, adding the evaluation report to the job's usage."""
    job = session.get(FineTuningJob, job_id)
    if job is None:
        return False
    usage = {**(job.usage or {}), "evaluation": evaluation}
    delta = ", ".join(f"pass@{k} {evaluation['base']['pass_at_k'][k]:.3f} -> {evaluation['tuned']['pass_at_k'][k]:.3f}"
                      for k in evaluation.get("pass_at_k_delta", {}))
    return transition(session, job_id, (JobStatus.EVALUATING,), JobStatus.SUCCEEDED,
                      f"The job has successfully completed; fine-tuned model: {job.fine_tuned_model}"
                      + (f" ({delta})" if delta else ""), data=evaluation, usage=usage)


def after_evaluation(session: Session, *, job_id: str, evaluation: dict) -> None:
    """Record a job's evaluation. A plain job ends succeeded. In an auto_iterate loop, the round is
    recorded and the loop either ends (the parent succeeds, reporting every round) or the next round
    is created, and enqueued after commit."""
    job = existing_job(session, job_id)
    parent = _loop_parent(session, job)
    if parent is None or (parent.id != job.id and parent.status != JobStatus.EVALUATING):
        finish_evaluation(session, job_id=job_id, evaluation=evaluation)
        return
    if job.id == parent.id:  # round 1 stays evaluating while the loop runs
        job.usage = {**(job.usage or {}), "evaluation": evaluation}
        session.flush()
    else:
        finish_evaluation(session, job_id=job_id, evaluation=evaluation)
    _next_round(session, parent)


def end_round(session: Session, *, job_id: str) -> None:
    """A round that failed or was cancelled ends its loop (the best round so far is reported).
    Nothing for a job outside a loop."""
    job = session.get(FineTuningJob, job_id)
    parent = _loop_parent(session, job) if job else None
    if parent is not None and parent.status == JobStatus.EVALUATING:
        _next_round(session, parent)


def _next_round(session: Session, parent: FineTuningJob) -> None:
    # Status changes are conditional UPDATEs that bypass loaded objects: read the rounds afresh.
    session.expire_all()
    policy = _policy(parent)
    history = rounds_of(session, parent)
    last = history[-1]
    outcome = "failed or cancelled" if last.score is None else f"{policy.target.metric} {last.score:.3f}"
    add_event(session, parent.id, f"Round {last.round} ({last.job_id}): {outcome} (target {policy.target.min})",
              data={"round": last.round, "score": last.score})
    reason = iteration.decide(history, policy)
    if reason:
        _conclude(session, parent, history, reason)
        return
    last_job = existing_job(session, last.job_id)
    spec, change = iteration.adjust(TrainingSpec.model_validate(last_job.spec), last.round + 1)
    spec = spec.model_copy(update={"auto_iterate": None})
    child = FineTuningJob(
        id=new_id("ftjob"), team_id=parent.team_id, model=parent.model, training_file=parent.training_file,
        validation_file=parent.validation_file, status=JobStatus.QUEUED, spec=spec.model_dump(mode="json"),
        suffix=parent.suffix, seed=parent.seed, metadata_=parent.metadata_, attempts=0,
        parent_job_id=parent.id, round=last.round + 1)
    session.add(child)
    session.flush()
    add_event(session, child.id, f"Round {child.round} of {parent.id}'s auto_iterate: {change}")
    add_event(session, parent.id, f"Round {child.round} started as {child.id}: {change}",
              data={"round": child.round, "job_id": child.id, "change": change})
    enqueue_after_commit(session, child.id)


def _conclude(session: Session, parent: FineTuningJob, history: list[iteration.RoundResult], reason: str) -> None:
    top = iteration.best(history)
    report: dict[str, Any] = {"stop_reason": reason,
                              "rounds": [{"round": r.round, "job_id": r.job_id, "score": r.score} for r in history],
                              "best": None}
    if top is not None:
        best_job = existing_job(session, top.job_id)
        adapter = adapters.for_job(session, top.job_id)
        report["best"] = {"round": top.round, "job_id": top.job_id, "score": top.score,
                          "fine_tuned_model": best_job.fine_tuned_model, "adapter_id": adapter.id if adapter else None}
    usage = {**(parent.usage or {}), "auto_iterate": report}
    best_text = f"best: round {top.round} ({top.score:.3f})" if top else "no round succeeded"
    transition(session, parent.id, (JobStatus.EVALUATING,), JobStatus.SUCCEEDED,
               f"auto_iterate finished after {len(history)} round(s): {reason}; {best_text}", data=report, usage=usage)
