"""The evaluation pipeline: read what an evaluation needs, generate completions (or take the
team's), run them in the sandbox, score pass@k, store the per-sample results, and record each
outcome under the claim's lease. Between batches of completions and before each program it checks
for a cancel request, its wall-time limit (the team's evaluation_wall_seconds) and a lost lease
(StopCheck), and stops there. An evaluation of a job's adapter also checks its tasks against
the job's training and validation files (app/domains/evaluations/overlap.py): its result's
`overlap` section says whether the score is measured on tasks the model was trained on."""

from __future__ import annotations

import json
import logging
import resource
import time
import traceback
from dataclasses import asdict, dataclass
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.storage import get_storage
from app.domains.adapters import service as adapters
from app.domains.adapters.models import Adapter
from app.domains.evaluations import overlap, roles
from app.domains.evaluations import service as evaluations
from app.domains.evaluations.models import Evaluation
from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import service as files
from app.domains.files.errors import FileNotFound
from app.domains.jobs.models import FineTuningJob
from app.domains.base_models import service as base_models
from app.domains.quotas import service as quotas
from worker.evaluation.errors import EvaluationStopped
from worker.lease import DB_DOWN, Lease
from worker.staging import stage_base, stage_file, stage_tree

if TYPE_CHECKING:
    from worker.evaluation.tasks_io import Task

log = logging.getLogger("tuneforge.evaluation")


@dataclass(frozen=True)
class Plan:
    """What one evaluation needs, read in one short transaction."""

    id: str
    team_id: str
    role: str | None
    settings: SamplingSpec
    tasks_key: str | None  # storage keys, staged by the worker; None: built-in HumanEval
    completions_key: str | None
    base_path: Path | None
    adapter_prefix: str | None  # the adapter's peft directory in storage
    quantized: bool = False  # the base loaded 4-bit (roles.Loading)
    # (file id, storage key or None when the file was deleted) of the data the evaluated adapter was
    # trained on; empty: no overlap check (the base, a standalone evaluation)
    training_files: tuple[tuple[str, str | None], ...] = ()
    wall_seconds: float | None = None  # the team's evaluation_wall_seconds; None: no limit


@lru_cache
def _sandbox():
    """One sandbox per worker process: its identities and self-check are set up once."""
    from worker.evaluation.sandbox import Sandbox

    return Sandbox(mode="auto", allow_weak_sandbox=get_settings().allow_weak_sandbox)


def plan(session, row: Evaluation) -> Plan:
    """Raises when the evaluation's model, adapter or task files are gone."""
    def file_key(file_id: str) -> str:
        return files.get(session, team_id=row.team_id, file_id=file_id).storage_key

    adapter = session.get(Adapter, row.adapter_id) if row.adapter_id else None
    base = base_models.get_base(session, row.base_model) if row.base_model else None
    return Plan(
        id=row.id, team_id=row.team_id, role=row.role, settings=SamplingSpec.model_validate(row.settings),
        tasks_key=None if row.tasks == "humaneval" else file_key(row.tasks),
        completions_key=file_key(row.completions_file) if row.completions_file else None,
        base_path=Path(base.path) if base else None,
        adapter_prefix=adapters.files_prefix(adapter.storage_prefix) if adapter else None,
        quantized=roles.loading(row.role).quantized, training_files=_training_files(session, row),
        wall_seconds=quotas.limits(session, row.team_id).evaluation_wall_seconds,
    )


class StopCheck:
    """Called between batches and programs of one evaluation: raises EvaluationStopped, and keeps
    raising, once the lease is lost, the evaluation passed its wall-time limit, or a cancel was
    requested (the database is asked at most every poll_seconds)."""

    def __init__(self, plan: Plan, lease: Lease, *, poll_seconds: float = 0.5) -> None:
        self.plan, self.lease, self.poll_seconds = plan, lease, poll_seconds
        self.began = time.monotonic()
        self._polled = 0.0
        self.stopped: EvaluationStopped | None = None

    def __call__(self) -> None:
        if self.stopped is None:
            self.stopped = self._why()
        if self.stopped is not None:
            raise self.stopped

    def _why(self) -> EvaluationStopped | None:
        if self.lease.lost.is_set():
            return EvaluationStopped("lost", "the evaluation's lease was lost")
        elapsed, limit = time.monotonic() - self.began, self.plan.wall_seconds
        if limit is not None and elapsed > limit:
            return EvaluationStopped("limit", f"the evaluation ran for {elapsed:,.0f} s, past its limit of "
                                              f"{limit:,.0f} s (the team's evaluation_wall_seconds)")
        now = time.monotonic()
        if now - self._polled < self.poll_seconds:
            return None
        self._polled = now
        try:
            with session_scope() as session:
                asked = evaluations.cancel_requested(session, ids=[self.plan.id], lease_token=self.lease.token)
        except DB_DOWN as exc:
            log.warning("evaluation %s: cancel check skipped, database unreachable: %s", self.plan.id, exc)
            return None
        return EvaluationStopped("cancel", "the evaluation was cancelled") if asked else None


def _training_files(session, row: Evaluation) -> tuple[tuple[str, str | None], ...]:
    """The job's training and validation files, for an evaluation of the job's adapter."""
    if row.job_id is None or not roles.loading(row.role).adapter:
        return ()
    job = session.get(FineTuningJob, row.job_id)
    found: list[tuple[str, str | None]] = []
    for file_id in (job.training_file, job.validation_file) if job else ():
        if file_id:
            try:
                found.append((file_id, files.get(session, team_id=row.team_id, file_id=file_id).storage_key))
            except FileNotFound:  # deleted since training: what is left is still checked
                found.append((file_id, None))
    return tuple(found)


def _records(paths: list[Path]) -> Iterator[dict]:
    """Every JSON object of these JSONL files, streamed."""
    for path in paths:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:  # validated at upload; a line that is not JSON holds no task
                        continue
                    if isinstance(record, dict):
                        yield record


def check_overlap(tasks: list[Task], training_files: tuple[tuple[str, str | None], ...]) -> dict:
    """The overlap section of an evaluation's result: which of the evaluated tasks are in the
    training files, staged from storage; `files` lists those checked and `missing` those deleted
    since training."""
    checked = [(file_id, key) for file_id, key in training_files if key is not None]
    found = overlap.find(((t.task_id, t.record, t.format) for t in tasks),
                         _records([stage_file(key) for _, key in checked]))
    return {**found.summary(files=[file_id for file_id, _ in checked]),
            "missing": [file_id for file_id, key in training_files if key is None]}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _evaluate(plan: Plan, stop: Callable[[], None]) -> tuple[dict, str]:
    """Score one evaluation; returns (result summary, storage key of the per-sample JSONL). Raises
    EvaluationStopped where stop() does."""
    from worker.evaluation import generate, harness, tasks_io

    start, cpu0 = time.monotonic(), _cpu_seconds()
    tasks = (tasks_io.builtin_humaneval_tasks() if plan.tasks_key is None
             else tasks_io.read_tasks(stage_file(plan.tasks_key)))
    if plan.settings.limit:
        tasks = tasks[:plan.settings.limit]
    problems, prompts = tasks_io.problems_and_prompts(tasks)
    summary: dict = {}
    if plan.training_files:
        summary["overlap"] = check_overlap(tasks, plan.training_files)
    if plan.completions_key is not None:
        with open(stage_file(plan.completions_key), encoding="utf-8") as f:
            samples = [s for s in harness.read_samples(f, problems=None) if s.task_id in problems]
    else:
        adapter_dir = stage_tree(plan.adapter_prefix) if plan.adapter_prefix else None
        base_dir = stage_base(plan.base_path) if plan.base_path is not None else None
        model, tokenizer = generate.load(base_dir, adapter_dir, quantized=plan.quantized)
        summary["base_weights"] = generate.base_weights(model)
        summary["prompt_style"] = generate.prompt_style(tokenizer, plan.settings)
        samples, summary["generation_seconds"] = generate.generate(model, tokenizer, prompts, plan.settings,
                                                                   stop=stop)
        summary["heldout_loss"] = generate.heldout_loss(model, tokenizer, generate.heldout_texts())
        del model
    exec_start = time.monotonic()
    score = harness.score(_sandbox(), samples, problems=problems, ks=plan.settings.k,
                          timeout_s=plan.settings.timeout_seconds, stop=stop)
    outcomes: dict[str, int] = {}
    for r in score.results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    summary.update(
        pass_at_k={str(k): v for k, v in sorted(score.pass_at_k.items())}, tasks=score.tasks,
        samples=score.samples, passed=sum(r.passed for r in score.results), outcomes=outcomes,
        sandbox_mode=score.mode, execution_seconds=time.monotonic() - exec_start,
        wall_seconds=time.monotonic() - start, cpu_seconds=_cpu_seconds() - cpu0,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    key = evaluations.results_key(team_id=plan.team_id, evaluation_id=plan.id)
    storage = get_storage()
    with storage.temp_file() as tmp:
        for r in score.results:
            tmp.write((json.dumps(asdict(r)) + "\n").encode())
    storage.commit(tmp.name, key)
    return summary, key


def run_plans(plans: list[Plan], lease: Lease) -> dict[str, dict]:
    """Run each plan, recording each outcome as it ends while the lease is held. Returns
    {evaluation id: summary}; re-raises the first failure after marking that evaluation (and the
    ones not run) failed. Stops early, writing nothing more, once the lease is lost. Raises
    EvaluationStopped when one stopped: "cancel" after recording it cancelled, "limit" after
    recording it (and the ones not run) failed with code cost_limit_exceeded, "lost" with nothing
    written."""
    results: dict[str, dict] = {}
    for i, p in enumerate(plans):
        if lease.lost.is_set():
            break
        try:
            summary, key = _evaluate(p, StopCheck(p, lease))
        except EvaluationStopped as stopped:
            log.info("evaluation %s stopped: %s", p.id, stopped)
            if stopped.reason == "cancel":
                with session_scope() as session:
                    evaluations.cancelled(session, ids=[p.id], lease_token=lease.token)
            elif stopped.reason == "limit":
                fail([later.id for later in plans[i:]], lease.token, stopped, code="cost_limit_exceeded")
            raise
        except Exception as exc:
            log.error("evaluation %s failed:\n%s", p.id, traceback.format_exc())
            fail([later.id for later in plans[i:]], lease.token, exc)
            raise
        with session_scope() as session:
            if evaluations.succeed(session, evaluation_id=p.id, lease_token=lease.token, result=summary,
                                   results_key=key):
                results[p.id] = summary
    return results


def fail(ids: list[str], token: str, exc: Exception, *, code: str = "evaluation_error") -> None:
    """Mark these held evaluations failed with the exception's message."""
    message = str(exc) if isinstance(exc, EvaluationStopped) else f"{type(exc).__name__}: {exc}"
    with session_scope() as session:
        for evaluation_id in ids:
            evaluations.fail(session, evaluation_id=evaluation_id, lease_token=token, code=code,
                             message=message[:2000])
