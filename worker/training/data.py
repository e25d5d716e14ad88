"""JSONL records -> training text -> token ids, and the batch collator.

Functions are pure (records in, strings or token id lists out) except
read_records and load_examples, which read a file, and ensure_pad_token, which
sets the tokenizer's pad token; so each dataset format is testable without a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

RecordFormat = Literal["chat", "humaneval", "prompt_completion", "mbpp", "text"]

# Checked in this order: the first format whose keys are all present wins.
# HumanEval has "prompt" and MBPP has "text", so each goes before the
# format it would otherwise be mistaken for.
_FORMAT_KEYS: tuple[tuple[RecordFormat, frozenset[str]], ...] = (
    ("chat", frozenset({"messages"})),
    ("humaneval", frozenset({"prompt", "canonical_solution", "test", "entry_point"})),
    ("prompt_completion", frozenset({"prompt", "completion"})),
    ("mbpp", frozenset({"text", "code", "test_list"})),
    ("text", frozenset({"text"})),
)


class DataFormatError(ValueError):
    """A training or validation record that cannot be turned into training text."""


@dataclass(frozen=True)
class TokenizedExamples:
    """Token ids of one dataset, one list per usable record.

    num_tokens counts real tokens (what the model trains on; padding is added
    later, per batch). num_truncated records were cut to max_seq_length;
    num_skipped records had fewer than 2 tokens and were left out, because a
    causal LM has no next token to predict from a single token.
    """

    input_ids: list[list[int]]
    num_tokens: int
    num_truncated: int
    num_skipped: int


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each non-blank line of a JSONL file.

    Raises DataFormatError naming the line when a line is not a JSON object,
    and OSError when the file cannot be read.
    """
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path.name} line {line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataFormatError(f"{path.name} line {line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def detect_format(record: dict[str, Any]) -> RecordFormat:
    """Name the dataset format of one record from its keys.

    Raises DataFormatError listing the accepted key sets when none matches.
    """
    keys = record.keys()
    for name, required in _FORMAT_KEYS:
        if required <= keys:
            return name
    accepted = "; ".join(f"{name}: {sorted(required)}" for name, required in _FORMAT_KEYS)
    raise DataFormatError(f"record has keys {sorted(keys)}, which match no format (accepted: {accepted})")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Use the eos token for padding when the tokenizer has no pad token (paper step 2).

    Mutates the tokenizer; returns True when it did. Raises ValueError when the
    tokenizer has no eos token either.
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; add one to the base model's tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    return True


def format_record(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The training text of one record, ending in the eos token.

    Raises DataFormatError for an unknown format or malformed chat messages.
    """
    kind = detect_format(record)
    eos = tokenizer.eos_token
    if kind == "chat":
        return _chat_text(record["messages"], tokenizer)
    if kind == "humaneval":
        return f"{record['prompt']}{record['canonical_solution']}{eos}"
    if kind == "prompt_completion":
        return f"{record['prompt']}{record['completion']}{eos}"
    if kind == "mbpp":
        return f"{record['text']}\n{record['code']}{eos}"
    return f"{record['text']}{eos}"


def _chat_text(messages: Any, tokenizer: PreTrainedTokenizerBase) -> str:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError("'messages' must be a non-empty list of {role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataFormatError(f"each message needs string 'role' and 'content', got {m!r:.200}")
    if tokenizer.chat_template is None:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + tokenizer.eos_token
    # The template emits the model's own end-of-turn tokens; no eos is appended.
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode_record(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Untruncated token ids of one record's training text.

    Chat-template output is tokenized without special tokens: templates
    already write the bos token as text, and adding it again would double it.
    Raises DataFormatError from format_record.
    """
    text = format_record(record, tokenizer)
    templated = detect_format(record) == "chat" and tokenizer.chat_template is not None
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def collect_examples(token_ids: Iterable[list[int]], max_seq_length: int) -> TokenizedExamples:
    """Keep the first max_seq_length tokens of each example and count what was kept.

    Truncation keeps the start (the prompt) so the model still sees what the
    answer responds to.
    """
    input_ids: list[list[int]] = []
    truncated = skipped = 0
    for ids in token_ids:
        if len(ids) > max_seq_length:
            ids = ids[:max_seq_length]
            truncated += 1
        if len(ids) < 2:
            skipped += 1
            continue
        input_ids.append(ids)
    return TokenizedExamples(
        input_ids=input_ids,
        num_tokens=sum(len(ids) for ids in input_ids),
        num_truncated=truncated,
        num_skipped=skipped,
    )


def tokenize_records(
    records: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> TokenizedExamples:
    """encode_record + collect_examples. Raises DataFormatError for a bad record."""
    return collect_examples((encode_record(r, tokenizer) for r in records), max_seq_length)


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> TokenizedExamples:
    """tokenize_records for one JSONL file.

    Raises DataFormatError naming the file and line of the first bad record,
    ValueError when no record is usable, and OSError when the file cannot be read.
    """

    def encoded() -> Iterator[list[int]]:
        for line_no, record in read_records(path):
            try:
                yield encode_record(record, tokenizer)
            except DataFormatError as e:
                raise DataFormatError(f"{path.name} line {line_no}: {e}") from e

    examples = collect_examples(encoded(), max_seq_length)
    if not examples.input_ids:
        raise ValueError(f"{path.name} has no usable records (each needs at least 2 tokens)")
    return examples


class CausalLMCollator(DataCollatorForLanguageModeling):
    """DataCollatorForLanguageModeling(mlm=False) that masks padding by attention mask.

    The stock collator sets every label equal to pad_token_id to -100. With
    pad = eos (paper step 2) that also hides each example's own final eos, so
    the model never learns to stop. Here only padded positions are ignored.
    Batches: input_ids, attention_mask, labels, all (batch, longest) int64.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        super().__init__(tokenizer=tokenizer, mlm=False)

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch
