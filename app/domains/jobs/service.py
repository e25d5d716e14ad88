"""Fine-tuning jobs as the API sees them: create, read, cancel, pause, resume.

States and the one way they change are in jobs.states; what workers do with a job (claim,
record, finish, hand back) and the reaper's verbs are in jobs.lease; auto_iterate's rounds in
jobs.rounds. A running job has a lease holder, its worker: the API never ends a running job
itself, it asks through stop_request and the holder (or the reaper, if the holder died) acts on
it at its next step. Jobs that become queued here are enqueued after commit.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Select, String, cast, func, select, update
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.adapters import service as adapters
from app.domains.evaluations import service as evaluations
from app.domains.files import service as files
from app.domains.files.errors import FileNotFound
from app.domains.files.formats import PREFERENCE_FORMATS, RecordFormat
from app.domains.files.validation import TRAINABLE_FORMATS
from app.domains.jobs.errors import IllegalTransition, JobInvalid, JobNotFound, ModelNotFound
from app.domains.jobs.models import FineTuningJob, FineTuningJobEvent
from app.domains.jobs.rounds import end_round
from app.domains.jobs.schemas import EventList, EventRead, Hyperparameters, JobCreate, JobList, JobRead
from app.domains.jobs.spec import (DPO_DEFAULT_BETA, DpoSpec, InitAdapter, TrainingSettings, TrainingSpec,
                                   processes_conflict, validation_conflict)
from app.domains.jobs.states import (ACTIVE, CANCELLABLE, FINAL, RUNNING, UNHELD, WAITING, JobStatus, StopRequest,
                                     add_event, enqueue_after_commit, transition)
from app.domains.base_models import service as base_models
from app.domains.base_models.models import RegisteredModel
from app.domains.quotas import service as quotas
from app.domains.quotas.errors import CostLimitExceeded

DEFAULT_LR = TrainingSettings().learning_rate


# -- creation -----------------------------------------------------------------

def resolve_spec(body: JobCreate, seed: int, init_adapter: InitAdapter | None = None) -> TrainingSpec:
    """Merge OpenAI's method and hyperparameters into Tuneforge's training settings; init_adapter is
    the fine-tuned model the job starts from (see resolve_model). Raises JobInvalid when they
    contradict each other."""
    training = body.training or TrainingSettings()
    hp: Hyperparameters | None = body.hyperparameters
    method = body.method.type if body.method else "supervised"
    block = getattr(body.method, method, None) if body.method else None
    if block is not None and block.hyperparameters is not None:
        if hp is not None:
            raise JobInvalid(f"Give hyperparameters either at the top level or in method.{method}, not both.",
                             param=f"method.{method}.hyperparameters")
        hp = block.hyperparameters
    hp = hp or Hyperparameters()
    dpo = None
    if method == "dpo":
        beta = getattr(hp, "beta", "auto")
        dpo = DpoSpec(beta=DPO_DEFAULT_BETA if beta == "auto" else beta)
        _check_dpo_settings(body, training)
    if init_adapter is not None and body.lora is not None:
        raise JobInvalid(f"lora cannot be given when continuing from {init_adapter.model}: training goes on with "
                         "that adapter's own LoRA configuration. Omit lora, or start from a base model.",
                         param="lora")
    if body.auto_iterate is not None and (dpo is not None or init_adapter is not None):
        raise JobInvalid("auto_iterate retrains supervised jobs from a base model; it does not apply to DPO jobs or "
                         "to jobs that continue from a fine-tuned model. Omit auto_iterate.", param="auto_iterate")
    changes: dict[str, Any] = {}
    if hp.n_epochs != "auto":
        changes["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        if hp.batch_size % training.batch_size:
            raise JobInvalid(
                f"hyperparameters.batch_size ({hp.batch_size}) must be a multiple of training.batch_size "
                f"({training.batch_size}), the micro-batch it is accumulated from.", param="hyperparameters.batch_size")
        changes["gradient_accumulation_steps"] = hp.batch_size // training.batch_size
    if hp.learning_rate_multiplier != "auto":
        changes["learning_rate"] = training.learning_rate * hp.learning_rate_multiplier
    if changes:
        training = training.model_copy(update=changes)
        training = TrainingSettings.model_validate(training.model_dump())
    conflict = (validation_conflict(training, has_validation_file=bool(body.validation_file))
                or processes_conflict(training, dpo=dpo is not None))
    if conflict is not None:
        raise JobInvalid(conflict[0], param=conflict[1])
    return TrainingSpec(lora=body.lora or TrainingSpec().lora,
                        quantization=body.quantization or TrainingSpec().quantization,
                        training=training, evaluation=body.eval, auto_iterate=body.auto_iterate, seed=seed,
                        dpo=dpo, init_adapter=init_adapter, integrations=tuple(body.integrations or ()),
                        device=body.device)


def _check_dpo_settings(body: JobCreate, training: TrainingSettings) -> None:
    """Refuse the training settings a DPO job cannot honour: its loss always falls on the two answers
    (never the prompt), and each micro-batch is a padded batch of answer pairs, never packed."""
    given = body.training.model_fields_set if body.training is not None else set()
    if "completion_only_loss" in given and not training.completion_only_loss:
        raise JobInvalid("A DPO job compares the log-likelihoods of the two answers only; "
                         "training.completion_only_loss false does not apply. Omit it.",
                         param="training.completion_only_loss")
    if training.packing is True:
        raise JobInvalid("A DPO job runs each micro-batch as padded pairs of answers; training.packing true does "
                         "not apply. Omit it.", param="training.packing")


def resolve_model(session: Session, *, team_id: str, model: str) -> tuple[RegisteredModel, InitAdapter | None]:
    """(the base model, the adapter to start from) that a job's `model` names: a registered base model, or
    one of the team's fine-tuned models (ft:..., its adapter's name). Raises ModelNotFound."""
    init = None
    name = model
    if model.startswith("ft:"):
        adapter = adapters.get_by_name(session, team_id=team_id, name=model)
        if adapter is None:
            raise ModelNotFound(f"Fine-tuned model {model!r} is not one of your team's models; GET /v1/models lists "
                                "them (a checkpoint's model cannot be trained on; use its job's).", param="model")
        init, name = InitAdapter(id=adapter.id, model=model), adapter.base_model
    base = base_models.get_base(session, name)
    if base is None:
        raise ModelNotFound(f"Base model {name!r} is not registered. GET /v1/models lists the base models.",
                            param="model")
    return base, init


def _check_file(session: Session, team_id: str, file_id: str, param: str, method: str = "supervised") -> None:
    """Raises JobInvalid unless the file exists, has not expired, and holds fine-tune records that
    the job's method trains on (preference records for DPO, the others for supervised). Locks the
    file's row (shared) until the job's transaction ends, so the reaper cannot delete it before the
    job that needs it is committed."""
    try:
        row = files.get(session, team_id=team_id, file_id=file_id, lock=True)
    except FileNotFound:
        raise JobInvalid(f"{param} {file_id!r} does not exist. Upload it with POST /v1/files first.",
                         param=param, code="file_not_found") from None
    if files.expired(row):
        raise JobInvalid(f"{param} {file_id!r} has expired (its expires_after passed) and is being deleted; "
                         "upload it again.", param=param, code="file_expired")
    if row.purpose != "fine-tune":
        raise JobInvalid(f"{param} {file_id!r} has purpose {row.purpose!r}; it must be 'fine-tune'.", param=param)
    if method == "dpo" and row.format not in PREFERENCE_FORMATS:
        raise JobInvalid(f"{param} {file_id!r} holds {row.format} records; a DPO job (method.type 'dpo') trains on "
                         'preference records: {"input": {"messages": [...]}, "preferred_output": [...], '
                         '"non_preferred_output": [...]}.', param=param)
    if method != "dpo" and row.format == RecordFormat.PREFERENCE:
        raise JobInvalid(f"{param} {file_id!r} holds preference records, which DPO trains on: give method "
                         '{"type": "dpo"}, or a file of chat records for supervised fine-tuning.', param=param)
    if method != "dpo" and row.format not in TRAINABLE_FORMATS:
        raise JobInvalid(f"{param} {file_id!r} holds {row.format} records, which cannot be trained on; "
                         f"use one of {', '.join(TRAINABLE_FORMATS)}.", param=param)


def _check_cost(session: Session, *, team_id: str, base: RegisteredModel, spec: TrainingSpec,
                training_file: str) -> None:
    """Refuse a job whose cost is unbounded by what it asks: a sequence length past the base
    model's context (JobInvalid), a LoRA rank past limits.lora_r, an evaluation past
    limits.evaluation_samples, or an estimate of its trained tokens past the team's trained_tokens
    limit (CostLimitExceeded). The estimate is an upper bound, known before any tokenizer runs: per
    epoch, the training file's size in bytes (a byte-level tokenizer's token covers at least one
    byte, and the JSON around the text outweighs a chat template's own tokens), or its records x
    max_seq_length (each is truncated there) when that is less; times the epochs, or max_steps x the
    examples of a step x max_seq_length when that is less."""
    t = spec.training
    context = base_models.context_of(base)
    if context is not None and t.max_seq_length > context:
        raise JobInvalid(f"training.max_seq_length ({t.max_seq_length}) is longer than the context of {base.id} "
                         f"({context} tokens); give at most {context}.", param="training.max_seq_length",
                         code="context_length_exceeded")
    max_r = get_settings().limits.lora_r
    if spec.lora.r > max_r:
        raise CostLimitExceeded(f"lora.r ({spec.lora.r}) is above the largest rank this service trains ({max_r}); "
                                f"give at most {max_r} (the paper's recipe uses 8).", param="lora.r",
                                extra={"limit": max_r})
    if spec.evaluation is not None:
        evaluations.check_samples(session, team_id=team_id, tasks=spec.evaluation.tasks,
                                  settings=spec.evaluation.sampling(), param="eval.n")
    row = files.get(session, team_id=team_id, file_id=training_file)
    per_epoch = min(row.bytes, row.examples * t.max_seq_length)
    estimate = per_epoch * t.epochs
    how = (f"{t.epochs} epoch(s) of at most {per_epoch:,} tokens: the file's {row.bytes:,} bytes or its "
           f"{row.examples:,} records x max_seq_length {t.max_seq_length}, whichever is less")
    if t.max_steps is not None:
        by_steps = t.max_steps * t.batch_size * t.gradient_accumulation_steps * t.max_seq_length
        if by_steps < estimate:
            estimate = by_steps
            how = (f"max_steps {t.max_steps} x {t.batch_size * t.gradient_accumulation_steps} examples per step x "
                   f"max_seq_length {t.max_seq_length}")
    quotas.check_trained_tokens(session, team_id=team_id, estimate=estimate, how=how, param="training_file")


def create(session: Session, *, team_id: str, body: JobCreate) -> FineTuningJob:
    """Validate the request and create the job in 'queued'; it is enqueued after commit. Raises
    ModelNotFound, JobInvalid, CostLimitExceeded, QueueFull."""
    base, init = resolve_model(session, team_id=team_id, model=body.model)
    # OpenAI's: a random seed when none is given, stored in the spec and reported on the job.
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    spec = resolve_spec(body, seed, init)
    # 429 when the team has its limit of jobs waiting
    quotas.check_can_queue(session, team_id=team_id, jobs=counts(team_id))
    job = FineTuningJob(
        id=new_id("ftjob"), team_id=team_id, model=base.id, training_file=body.training_file,
        validation_file=body.validation_file, status=JobStatus.VALIDATING_FILES, spec=spec.model_dump(mode="json"),
        suffix=body.suffix, seed=seed, metadata_=body.metadata, attempts=0,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Validating training file: {body.training_file}")
    _check_file(session, team_id, body.training_file, "training_file", spec.method)
    if body.validation_file:
        _check_file(session, team_id, body.validation_file, "validation_file", spec.method)
    if body.eval and body.eval.tasks != "humaneval":
        evaluations.check_task_file(session, team_id=team_id, file_id=body.eval.tasks, param="eval.tasks")
    _check_cost(session, team_id=team_id, base=base, spec=spec, training_file=body.training_file)
    transition(session, job.id, (JobStatus.VALIDATING_FILES,), JobStatus.QUEUED, "Files validated; job queued")
    enqueue_after_commit(session, job.id)
    session.refresh(job)
    return job


# -- reading --------------------------------------------------------------------

def get(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """The team's job. Raises JobNotFound for a missing id and for another team's, alike."""
    job = get_owned(session, FineTuningJob, job_id, team_id)
    if job is None:
        raise JobNotFound(f"No such fine-tuning job: {job_id!r}.", param="fine_tuning_job_id")
    return job


def list_page(session: Session, *, team_id: str, after: str | None, limit: int,
              metadata: dict[str, str] | None = None, without_metadata: bool = False) -> JobList:
    """The team's jobs, newest first: those whose metadata holds every metadata[key] = value pair,
    or, with without_metadata (OpenAI's metadata=null), those created without metadata."""
    stmt = select(FineTuningJob).where(FineTuningJob.team_id == team_id)
    if without_metadata:
        # SQL NULL, or the JSON null (and {}) a JSON column stores for None.
        stmt = stmt.where(func.coalesce(cast(FineTuningJob.metadata_, String), "null").in_(("null", "{}")))
    for key, value in (metadata or {}).items():
        stmt = stmt.where(FineTuningJob.metadata_[key].as_string() == value)
    rows, has_more = paginate(session, stmt, FineTuningJob.id, after=after, limit=limit)
    adapter_ids = adapters.ids_for_jobs(session, [r.id for r in rows])
    return JobList(data=[_read(r, adapter_ids.get(r.id)) for r in rows], has_more=has_more)


def events_page(session: Session, *, team_id: str, job_id: str, after: str | None, limit: int) -> EventList:
    get(session, team_id=team_id, job_id=job_id)
    stmt = select(FineTuningJobEvent).where(FineTuningJobEvent.job_id == job_id)
    rows, has_more = paginate(session, stmt, FineTuningJobEvent.id, after=after, limit=limit)
    return EventList(data=[_event_read(e) for e in rows], has_more=has_more)


def events_after(session: Session, *, team_id: str, job_id: str, after: str | None,
                 limit: int) -> tuple[list[EventRead], bool]:
    """The job's events written after event `after` (None: from its first), oldest first, at most
    `limit`; and whether the job had ended before they were read: the status is read first, and a
    final state is written with its event, so once it shows ended no event is missed. Raises
    JobNotFound, and JobInvalid (param Last-Event-ID, where a stream resumes) when `after` is not
    one of the job's events."""
    job = get(session, team_id=team_id, job_id=job_id)
    ended = job.status in FINAL
    if after is not None and session.scalar(select(FineTuningJobEvent.id).where(
            FineTuningJobEvent.id == after, FineTuningJobEvent.job_id == job_id)) is None:
        raise JobInvalid(f"Last-Event-ID {after!r} is not an event of job {job_id}. Resume with the id of the last "
                         "event received, or send none to stream from the job's first event.",
                         param="Last-Event-ID", code="event_not_found")
    stmt = select(FineTuningJobEvent).where(FineTuningJobEvent.job_id == job_id)
    rows, _ = paginate(session, stmt, FineTuningJobEvent.id, after=after, limit=limit, order="asc")
    return [_event_read(e) for e in rows], ended


def _event_read(e: FineTuningJobEvent) -> EventRead:
    return EventRead(id=e.id, created_at=unix(e.created_at) or 0, level=e.level, message=e.message, data=e.data,
                     type=e.type)


def active_jobs_using_file(session: Session, *, team_id: str, file_id: str) -> list[str]:
    """The team's unfinished jobs that read the file: to train on, to validate with, or to evaluate
    on (the spec's evaluation.tasks, read again by every round of auto_iterate)."""
    stmt = select(FineTuningJob.id).where(
        FineTuningJob.team_id == team_id, FineTuningJob.status.in_(ACTIVE),
        (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id)
        | (FineTuningJob.spec[("evaluation", "tasks")].as_string() == file_id)).order_by(FineTuningJob.id)
    return list(session.scalars(stmt))


def counts(team_id: str) -> quotas.JobCounts:
    """The queries counting the team's jobs that its quotas limit: running, and waiting to start."""
    def count(states: tuple[JobStatus, ...]) -> Select:
        return select(func.count()).select_from(FineTuningJob).where(FineTuningJob.team_id == team_id,
                                                                      FineTuningJob.status.in_(states))
    return quotas.JobCounts(running=count(RUNNING), waiting=count(WAITING))


def to_read(session: Session, job: FineTuningJob) -> JobRead:
    adapter = adapters.for_job(session, job.id)
    return _read(job, adapter.id if adapter else None)


def _read(job: FineTuningJob, adapter_id: str | None) -> JobRead:
    spec = TrainingSpec.model_validate(job.spec)
    t = spec.training
    hp: dict[str, Any] = {"n_epochs": t.epochs, "batch_size": t.batch_size * t.gradient_accumulation_steps,
                          "learning_rate_multiplier": round(t.learning_rate / DEFAULT_LR, 6)}
    method = {"type": "supervised", "supervised": {"hyperparameters": hp}}
    if spec.dpo is not None:
        method = {"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": spec.dpo.beta}}}
    return JobRead(
        id=job.id, created_at=unix(job.created_at), error=job.error, fine_tuned_model=job.fine_tuned_model,
        finished_at=unix(job.finished_at), hyperparameters=hp,
        model=spec.init_adapter.model if spec.init_adapter is not None else job.model, organization_id=job.team_id,
        result_files=job.result_files or [], seed=job.seed, status=job.status, trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file, estimated_finish=unix(job.estimated_finish), metadata=job.metadata_,
        method=method, user_provided_suffix=job.suffix,
        integrations=[i.model_dump(mode="json", exclude_none=True) for i in spec.integrations] or None,
        spec=job.spec, usage=job.usage, adapter_id=adapter_id,
        parent_job_id=job.parent_job_id, round=job.round,
    )


# -- stopping and resuming -----------------------------------------------------------------

def cancel(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """Cancel a job that has not ended. One with no holder (queued, paused, ...) ends cancelled
    here; a running one gets a cancel request that its worker acts on at its next step (the reaper,
    if that worker died). Idempotent for an already cancelled job. Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    if job.status != JobStatus.CANCELLED:
        if not _cancel_one(session, job_id, "Job cancelled", "Cancellation requested"):
            session.refresh(job)
            raise IllegalTransition(
                f"Job {job_id} is {job.status}; only jobs that are {', '.join(CANCELLABLE)} can be cancelled.",
                param="fine_tuning_job_id")
        # auto_iterate: cancelling the loop cancels its running round; cancelling a round ends the loop.
        for child in session.scalars(select(FineTuningJob.id).where(FineTuningJob.parent_job_id == job_id)):
            _cancel_one(session, child, f"Cancelled with its parent job {job_id}",
                        f"Cancellation requested with its parent job {job_id}")
        if job.parent_job_id:
            end_round(session, job_id=job_id)
    session.refresh(job)
    return job


def _cancel_one(session: Session, job_id: str, message: str, request: str) -> bool:
    """Cancel directly, or ask the holder. Retried once: the job may have left running (reaped,
    handed back) between the two conditional UPDATEs."""
    for _ in range(2):
        if transition(session, job_id, UNHELD, JobStatus.CANCELLED, message):
            return True
        if _request_stop(session, job_id, StopRequest.CANCEL, f"{request}; the worker stops at its next step"):
            return True
    return False


def _request_stop(session: Session, job_id: str, request: StopRequest, message: str) -> bool:
    """Record a stop request on a running job for its holder. A cancel overrides a pending pause;
    a pause never overrides a pending cancel."""
    allowed = FineTuningJob.stop_request.is_(None) | (FineTuningJob.stop_request == request)
    if request == StopRequest.CANCEL:
        allowed = allowed | (FineTuningJob.stop_request == StopRequest.PAUSE)
    matched = session.execute(
        update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == JobStatus.RUNNING, allowed)
        .values(stop_request=request).returning(FineTuningJob.id).execution_options(synchronize_session=False)
    ).first()
    if matched is not None:
        add_event(session, job_id, message)
    return matched is not None


def pause(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """Pause a job: a queued one at once (it keeps its checkpoints), a running one through its
    worker, which checkpoints at its next step and moves it to paused. Idempotent for a paused job.
    Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    if job.status != JobStatus.PAUSED and not (
            transition(session, job_id, (JobStatus.QUEUED,), JobStatus.PAUSED, "Job paused before it started")
            or _request_stop(session, job_id, StopRequest.PAUSE,
                             "Pause requested; the worker checkpoints and pauses at its next step")):
        session.refresh(job)
        pending = " (a cancellation is pending)" if job.stop_request == StopRequest.CANCEL else ""
        raise IllegalTransition(f"Job {job_id} is {job.status}{pending}; only queued or running jobs can be paused.",
                                param="fine_tuning_job_id")
    session.refresh(job)
    return job


def resume(session: Session, *, team_id: str, job_id: str) -> FineTuningJob:
    """Resume a paused job: back to queued, to continue from its latest checkpoint, and enqueued
    after commit. A running job whose pause is still pending just has the request withdrawn.
    Raises JobNotFound, IllegalTransition."""
    job = get(session, team_id=team_id, job_id=job_id)
    if transition(session, job_id, (JobStatus.PAUSED,), JobStatus.QUEUED,
                  "Job resumed; queued to continue from its latest checkpoint", enqueued_at=utcnow()):
        enqueue_after_commit(session, job_id)
    else:
        withdrawn = session.execute(
            update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == JobStatus.RUNNING,
                                        FineTuningJob.stop_request == StopRequest.PAUSE)
            .values(stop_request=None).returning(FineTuningJob.id).execution_options(synchronize_session=False)
        ).first()
        if withdrawn is None:
            session.refresh(job)
            raise IllegalTransition(f"Job {job_id} is {job.status}; only paused jobs can be resumed.",
                                    param="fine_tuning_job_id")
        add_event(session, job_id, "Pause withdrawn; the job keeps running")
    session.refresh(job)
    return job


def model_name(*, base: str, team_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: ft:<base>:<org>:<suffix>:<id>."""
    return f"ft:{base}:{team_name}:{suffix or ''}:{job_id}"
