"""Contamination: which of an evaluation's code tasks also appear in the data the model was trained
on. A score on such tasks measures recall of the training data, not skill. Pure: no I/O; the
worker reads the files and passes their records.

A task overlaps a training record when one of the task's normal forms equals one of the record's
(formats.normalize_text, formats.normalize_code):
- task text: an mbpp task's description, a humaneval task's prompt, and the prompts an evaluation
  shows for it in both prompt styles (formats.task_prompt, formats.task_messages);
- task code: its reference solution (a humaneval task's prompt and canonical solution together).
A training record contributes every string it holds, whatever its format (chat message contents
included), as text and as code, the fenced code blocks in it as code, and a prompt followed by its
completion or canonical solution as code. So a task laid out by any of Tuneforge's own layouts,
reformatted, recommented or re-cased is found; a paraphrased task, or one quoted inside a longer
message, is not (exact normal forms, not near duplicates).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from app.domains.evaluations.extract import fenced_blocks
from app.domains.files import formats
from app.domains.files.formats import RecordFormat

REPORTED_IDS = 20  # the overlapping task ids a report lists
_TEXT, _CODE = "text", "code"


def _text_key(text: str) -> tuple[str, str] | None:
    normal = formats.normalize_text(text)
    return (_TEXT, normal) if normal else None


def _code_key(code: str) -> tuple[str, str] | None:
    normal = formats.normalize_code(code)
    return (_CODE, normal) if normal else None


def task_keys(record: Mapping[str, Any], fmt: RecordFormat) -> set[tuple[str, str]]:
    """The normal forms, as (kind, form) with kind "text" or "code", that identify a valid code task."""
    if fmt == RecordFormat.MBPP:
        texts, code = [record["text"]], record["code"]
    else:
        texts, code = [record["prompt"]], record["prompt"] + record["canonical_solution"]
    texts += [formats.task_prompt(record, fmt), *(m["content"] for m in formats.task_messages(record, fmt))]
    keys = {_text_key(t) for t in texts} | {_code_key(code)}
    return {k for k in keys if k is not None}


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif depth < 4 and isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v, depth + 1)
    elif depth < 4 and isinstance(value, list):
        for v in value:
            yield from _strings(v, depth + 1)


def record_keys(record: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The normal forms of everything a training record of any format holds (see the module docstring)."""
    keys: list[tuple[str, str] | None] = []
    for s in _strings(record):
        keys += [_text_key(s), _code_key(s), *(_code_key(code) for _, code in fenced_blocks(s))]
    prompt = record.get("prompt")
    for tail in ("canonical_solution", "completion"):
        if isinstance(prompt, str) and isinstance(record.get(tail), str):
            keys.append(_code_key(prompt + record[tail]))
    if formats.detect(record) == RecordFormat.MBPP and not formats.problems(record, RecordFormat.MBPP):
        keys.append(_text_key(formats.task_prompt(record, RecordFormat.MBPP)))
    return {k for k in keys if k is not None}


@dataclass(frozen=True)
class Overlap:
    tasks: int  # tasks checked
    task_ids: tuple[str, ...]  # the overlapping ones, in task order
    by_text: int  # overlapping tasks matched by their text
    by_code: int  # ... by their code (a task may count in both)
    records: int  # training records read

    @property
    def contaminated(self) -> bool:
        return bool(self.task_ids)

    def summary(self, *, files: Iterable[str] = ()) -> dict[str, Any]:
        """The overlap section of an evaluation's result and of a job's report."""
        return {"contaminated": self.contaminated, "count": len(self.task_ids), "tasks": self.tasks,
                "task_ids": list(self.task_ids[:REPORTED_IDS]), "by_text": self.by_text, "by_code": self.by_code,
                "training_records": self.records, "files": list(files)}


def find(tasks: Iterable[tuple[str, Mapping[str, Any], RecordFormat]],
         training: Iterable[Mapping[str, Any]]) -> Overlap:
    """Which tasks ((task id, record, format) of valid code tasks) overlap any of the training
    records. Streams the training records: memory grows with the tasks, not the training data."""
    order: list[str] = []
    index: dict[tuple[str, str], set[str]] = {}
    for task_id, record, fmt in tasks:
        order.append(task_id)
        for key in task_keys(record, fmt):
            index.setdefault(key, set()).add(task_id)
    hits: dict[str, set[str]] = {}
    records = 0
    for record in training:
        records += 1
        for key in record_keys(record) & index.keys():
            for task_id in index[key]:
                hits.setdefault(task_id, set()).add(key[0])
    found = tuple(t for t in dict.fromkeys(order) if t in hits)
    return Overlap(tasks=len(set(order)), task_ids=found, by_text=sum(_TEXT in hits[t] for t in found),
                   by_code=sum(_CODE in hits[t] for t in found), records=records)
