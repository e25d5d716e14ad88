"""Code tasks from a JSONL file (MBPP- or HumanEval-style) or the built-in HumanEval set, as the
harness's problems plus the prompt a model is given."""

from __future__ import annotations

import json
from pathlib import Path

from app.domains.files import formats
from app.domains.files.formats import RecordFormat
from worker.evaluation.generate import Prompt
from worker.evaluation.harness import HumanEvalProblem, MbppProblem, Problem, load_humaneval


def builtin_humaneval() -> tuple[dict[str, Problem], list[Prompt]]:
    problems = load_humaneval()
    prompts = [_prompt(p.task_id, {"prompt": p.prompt}, RecordFormat.HUMANEVAL) for p in problems.values()]
    return dict(problems), prompts


def _prompt(task_id: str, record: dict, fmt: RecordFormat) -> Prompt:
    """A task's prompt in both styles: formats.task_prompt (completion) and formats.task_messages (chat)."""
    return Prompt(task_id=task_id, text=formats.task_prompt(record, fmt), format=fmt.value,
                  messages=tuple(formats.task_messages(record, fmt)))


def from_jsonl(path: Path) -> tuple[dict[str, Problem], list[Prompt]]:
    """Problems and prompts of an uploaded task file (validated at upload, with the same format rule
    as here: app/domains/files/formats.py). Tasks without a task_id are numbered by line; the prompt
    is the task's training prompt in each style (formats.task_prompt and formats.task_messages).
    Raises RecordInvalid naming the line of a record that is not a valid mbpp or humaneval task."""
    problems: dict[str, Problem] = {}
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            try:
                fmt = formats.require(rec, formats.TASK_FORMATS)
            except formats.RecordInvalid as e:
                raise formats.RecordInvalid([f"{path.name} line {line_no}: {p}" for p in e.problems]) from None
            if fmt == RecordFormat.HUMANEVAL:
                task_id = str(rec.get("task_id", f"task/{line_no}"))
                problems[task_id] = HumanEvalProblem(task_id=task_id, prompt=rec["prompt"], test=rec["test"],
                                                     entry_point=rec["entry_point"],
                                                     canonical_solution=rec["canonical_solution"])
            else:
                task_id = str(rec.get("task_id", line_no))
                problems[task_id] = MbppProblem(task_id=task_id, test_list=tuple(rec["test_list"]),
                                                test_setup_code=rec.get("test_setup_code", ""),
                                                reference_code=rec["code"])
            prompts.append(_prompt(task_id, rec, fmt))
    return problems, prompts
