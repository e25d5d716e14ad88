"""Code tasks from a JSONL file (MBPP- or HumanEval-style) or the built-in HumanEval set: the task
records themselves (what the overlap check compares with training data), and the harness's
problems plus the prompt a model is given."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.domains.files import formats
from app.domains.files.formats import RecordFormat
from worker.evaluation.generate import Prompt
from worker.evaluation.harness import HumanEvalProblem, MbppProblem, Problem, load_humaneval


@dataclass(frozen=True)
class Task:
    """One valid code task: its id (the record's task_id, else numbered by line), record and format."""

    task_id: str
    record: dict[str, Any]
    format: RecordFormat


def builtin_humaneval_tasks() -> list[Task]:
    return [Task(p.task_id, {"task_id": p.task_id, "prompt": p.prompt, "canonical_solution": p.canonical_solution,
                             "test": p.test, "entry_point": p.entry_point}, RecordFormat.HUMANEVAL)
            for p in load_humaneval().values()]


def read_tasks(path: Path) -> list[Task]:
    """The tasks of an uploaded task file (validated at upload, with the same format rule as here:
    app/domains/files/formats.py), in file order. Tasks without a task_id are numbered by line
    (humaneval ones as task/<line>). Raises RecordInvalid naming the line of a record that is not a
    valid mbpp or humaneval task."""
    tasks: list[Task] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            try:
                fmt = formats.require(rec, formats.TASK_FORMATS)
            except formats.RecordInvalid as e:
                raise formats.RecordInvalid([f"{path.name} line {line_no}: {p}" for p in e.problems]) from None
            default_id = f"task/{line_no}" if fmt == RecordFormat.HUMANEVAL else line_no
            tasks.append(Task(str(rec.get("task_id", default_id)), rec, fmt))
    return tasks


def problems_and_prompts(tasks: list[Task]) -> tuple[dict[str, Problem], list[Prompt]]:
    """The harness's problems by task id, and each task's prompt in both styles (formats.task_prompt
    for completion, formats.task_messages for chat), in task order."""
    problems: dict[str, Problem] = {}
    prompts: list[Prompt] = []
    for t in tasks:
        rec = t.record
        if t.format == RecordFormat.HUMANEVAL:
            problems[t.task_id] = HumanEvalProblem(task_id=t.task_id, prompt=rec["prompt"], test=rec["test"],
                                                   entry_point=rec["entry_point"],
                                                   canonical_solution=rec["canonical_solution"])
        else:
            problems[t.task_id] = MbppProblem(task_id=t.task_id, test_list=tuple(rec["test_list"]),
                                              test_setup_code=rec.get("test_setup_code", ""),
                                              reference_code=rec["code"])
        prompts.append(Prompt(task_id=t.task_id, text=formats.task_prompt(rec, t.format), format=t.format.value,
                              messages=tuple(formats.task_messages(rec, t.format))))
    return problems, prompts


def builtin_humaneval() -> tuple[dict[str, Problem], list[Prompt]]:
    return problems_and_prompts(builtin_humaneval_tasks())


def from_jsonl(path: Path) -> tuple[dict[str, Problem], list[Prompt]]:
    """Problems and prompts of an uploaded task file (read_tasks, problems_and_prompts)."""
    return problems_and_prompts(read_tasks(path))


def named(source: str, limit: int | None = None) -> tuple[dict[str, Problem], list[Prompt]]:
    """Problems and prompts of "humaneval" (built in) or of a task file's path: its first `limit` tasks."""
    tasks = builtin_humaneval_tasks() if source == "humaneval" else read_tasks(Path(source))
    return problems_and_prompts(tasks[:limit] if limit else tasks)
