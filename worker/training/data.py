"""JSONL records -> training text -> token ids and labels, and the batch collators.

Functions are pure (records in, strings or token id lists out) except
read_records and load_examples, which read a file, and ensure_pad_token, which
sets the tokenizer's pad token; so each dataset format is testable without a model.

Labels follow Hugging Face's convention: labels[i] is the token at position i
and the model shifts them (position i predicts labels[i + 1]); -100 marks a
position whose token is not a training target (prompt tokens under
completion-only loss, padding, and the first token of each packed example).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening, PreTrainedTokenizerBase

from app.domains.files import formats
from app.domains.files.formats import PromptStyle, RecordFormat

IGNORE_INDEX = -100  # label of a position that is not a training target (torch cross_entropy's ignore_index)


class DataFormatError(ValueError):
    """A training or validation record that cannot be turned into training text."""


@dataclass(frozen=True)
class TokenizedExamples:
    """Token ids and labels of one dataset, one list each per usable record.

    labels[k] has the length of input_ids[k]: the token id where the token is a
    training target, IGNORE_INDEX where it is not (prompt tokens under
    completion-only loss). num_tokens counts real tokens (what the model reads;
    padding is added later, per batch), num_target_tokens the tokens with a
    label. num_truncated records were cut to max_seq_length; num_skipped
    records had fewer than 2 tokens, or no target token left, and were left
    out: a causal LM learns nothing from them.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    num_tokens: int
    num_target_tokens: int
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
                raise DataFormatError(f"{path.name} line {line_no}: expected a JSON object, "
                                      f"got {type(record).__name__}")
            yield line_no, record


def trainable_format(record: dict[str, Any]) -> RecordFormat:
    """The format of one valid, trainable record (app/domains/files/formats.py decides, as it does at
    upload). Raises DataFormatError naming what is wrong when the record is of no format, is not
    trainable, or breaks its format's requirements."""
    if formats.detect(record) is None:
        raise DataFormatError(f"record has keys {sorted(record)}, which match no format; write each line in "
                              f"one of these shapes: {formats.SHAPES}")
    try:
        return formats.require(record, formats.TRAINABLE_FORMATS)
    except formats.RecordInvalid as e:
        raise DataFormatError(str(e)) from None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Use the eos token for padding when the tokenizer has no pad token (so batches can be padded).

    Mutates the tokenizer; returns True when it did. Raises ValueError when the
    tokenizer has no eos token either.
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; "
                         "add one to the base model's tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    return True


def format_record(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                  prompt_style: str = PromptStyle.COMPLETION) -> str:
    """The training text of one record, ending in the eos token (or the template's end of turn).

    Raises DataFormatError for an unknown format or malformed chat messages.
    """
    return _layout(record, tokenizer, prompt_style).text


Span = tuple[int, int]  # characters [start, end) of a text


@dataclass(frozen=True)
class _Layout:
    """A record's training text and what in it the model should write: `targets`, the character spans
    of the completion (of each assistant turn with weight 1, for chat); `weighted_out`, those of the
    assistant turns with weight 0, which no loss falls on whatever completion_only_loss says;
    `templated`, whether the text is a chat-template rendering (tokenized without special tokens)."""

    text: str
    targets: list[Span]
    weighted_out: list[Span]
    templated: bool


def _layout(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, prompt_style: str) -> _Layout:
    """The record's _Layout.

    The spans are the completion of each format (everything for plain text);
    each includes the eos or end-of-turn text that follows it, so the model
    learns to stop. A chat record is rendered with its top-level "tools" (see
    chat_text_and_targets). A code task (mbpp, humaneval) in the chat prompt style
    (formats.resolve_prompt_style) is the chat formats.task_conversation gives:
    the task as the user's turn, its fenced reference code as the assistant's.
    Raises DataFormatError like format_record.
    """
    kind = trainable_format(record)
    tools = None
    if kind == RecordFormat.CHAT:
        messages, tools = record["messages"], record.get("tools")
    elif kind in formats.TASK_FORMATS and prompt_style_for(tokenizer, prompt_style) == PromptStyle.CHAT:
        messages = formats.task_conversation(record, kind)
    else:
        prompt, completion = formats.prompt_and_completion(record, kind)
        text = f"{prompt}{completion}{tokenizer.eos_token}"
        return _Layout(text, [(len(prompt), len(text))], [], False)
    text, targets, weighted_out = _chat_layout(messages, tokenizer, tools)
    return _Layout(text, targets, weighted_out, tokenizer.chat_template is not None)


def prompt_style_for(tokenizer: PreTrainedTokenizerBase, requested: str) -> PromptStyle:
    """The prompt style code-task records are laid out in for this tokenizer (auto: chat when it has a
    chat template); what a training run records as its prompt style."""
    return formats.resolve_prompt_style(requested, has_chat_template=tokenizer.chat_template is not None)


def chat_text_and_targets(
    messages: Any, tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[Span]]:
    """(training text, spans of the assistant turns the model learns) of chat messages and their tools.

    The text is formats.render_chat's, the rendering serving uses for the same conversation: the
    tokenizer's chat template when it has one (tool calls natively where the template supports them,
    else in the plain tool layout), else the plain chat layout ending in the eos token, which the last
    assistant turn's span includes. An assistant turn's span covers its content and its tool calls as
    rendered; tool results, system and user turns are never targets, nor is an assistant turn with
    "weight": 0. Raises DataFormatError when a message lacks a string role, or content (or calls)."""
    text, targets, _ = _chat_layout(messages, tokenizer, tools)
    return text, targets


def _chat_layout(messages: Any, tokenizer: PreTrainedTokenizerBase,
                 tools: list[dict[str, Any]] | None) -> tuple[str, list[Span], list[Span]]:
    """(text, spans of assistant turns with weight 1, spans of those with weight 0); see chat_text_and_targets."""
    try:
        text = formats.render_chat(tokenizer, messages, tools)
    except formats.RecordInvalid as e:
        raise DataFormatError(str(e)) from None
    weights = [m.get("weight", 1) for m in messages if m.get("role") == "assistant"]
    spans: list[Span | None]
    if tokenizer.chat_template is None:
        turns = formats.plain_tool_messages(formats.template_messages(messages), tools)
        text += tokenizer.eos_token
        found = formats.plain_chat(turns)[1]
        if turns[-1]["role"] == "assistant":
            found[-1] = (found[-1][0], len(text))
        spans = list(found)
    else:
        # The template emits the model's own end-of-turn tokens; no eos is appended.
        spans = _assistant_spans(messages, text, tokenizer, tools)
    targets = [s for s, w in zip(spans, weights, strict=True) if s is not None and w != 0]
    weighted_out = [s for s, w in zip(spans, weights, strict=True) if s is not None and w == 0]
    return text, targets, weighted_out


def _assistant_spans(messages: list[dict[str, Any]], text: str, tokenizer: PreTrainedTokenizerBase,
                     tools: list[dict[str, Any]] | None) -> list[Span | None]:
    """Character spans of the assistant turns in a chat-template rendering, each with its end-of-turn text;
    one per assistant message, in order, None where a turn is not found.

    A turn runs from the end of the rendering of the messages before it plus
    the generation prompt, to the end of the rendering through it (both by
    formats.render_chat, with the same tools); that holds for templates whose
    renderings extend each other, and takes in the turn's tool calls as the
    template writes them. For a template where they do not, the span is the
    message's text (its content, or its content and calls in the plain tool
    layout) found in order in the text, plus an eos token right after it.
    """
    native = formats.template_supports_tools(tokenizer.chat_template)
    plain = formats.plain_tool_messages(formats.template_messages(messages))
    spans: list[Span | None] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = formats.render_chat(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        through = formats.render_chat(tokenizer, messages[: i + 1], tools)
        if i and text.startswith(through) and through.startswith(prefix) and len(prefix) >= cursor:
            spans.append((len(prefix), len(through)))
            cursor = len(through)
            continue
        needle = formats.content_text(m.get("content")) if native else formats.content_text(plain[i]["content"])
        start = text.find(needle, cursor) if needle else -1
        if not needle or start < 0:
            spans.append(None)
            continue
        end = start + len(needle)
        if tokenizer.eos_token and text.startswith(tokenizer.eos_token, end):
            end += len(tokenizer.eos_token)
        spans.append((start, end))
        cursor = end
    return spans


def encode_record(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                  prompt_style: str = PromptStyle.COMPLETION) -> list[int]:
    """Untruncated token ids of one record's training text.

    Chat-template output is tokenized without special tokens: templates
    already write the bos token as text, and adding it again would double it.
    Raises DataFormatError from format_record.
    """
    return encode_record_with_labels(record, tokenizer, completion_only=False, prompt_style=prompt_style)[0]


def encode_record_with_labels(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, completion_only: bool,
    prompt_style: str = PromptStyle.COMPLETION,
) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one record, untruncated, code tasks laid out in `prompt_style`.

    With completion_only, a token is a target when its characters overlap the
    record's completion (see _layout); a token straddling the
    prompt/completion boundary counts as completion. Otherwise every token is.
    Either way a token of an assistant turn with "weight": 0 is no target
    (label IGNORE_INDEX), unless it also overlaps a learned turn.
    Raises DataFormatError for a bad record, ValueError for completion_only
    or weights with a tokenizer that has no character offsets (not a fast tokenizer).
    """
    layout = _layout(record, tokenizer, prompt_style)
    if not completion_only and not layout.weighted_out:
        ids = tokenizer(layout.text, add_special_tokens=not layout.templated)["input_ids"]
        return ids, list(ids)
    if not tokenizer.is_fast:
        what = "training.completion_only_loss" if completion_only else 'a message with "weight": 0'
        raise ValueError(f"{what} needs a fast tokenizer (character offsets per token); this base model's "
                         "tokenizer is not one: set training.completion_only_loss to false and drop the weights")
    enc = tokenizer(layout.text, add_special_tokens=not layout.templated, return_offsets_mapping=True)

    def overlaps(start: int, end: int, spans: list[Span]) -> bool:
        return end > start and any(end > s and start < e for s, e in spans)

    def is_target(start: int, end: int) -> bool:
        if overlaps(start, end, layout.targets):
            return True
        return not completion_only and not overlaps(start, end, layout.weighted_out)

    ids = enc["input_ids"]
    labels = [tok if is_target(start, end) else IGNORE_INDEX
              for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels


def collect_examples(
    token_ids: Iterable[list[int] | tuple[list[int], list[int]]], max_seq_length: int
) -> TokenizedExamples:
    """Keep the first max_seq_length tokens of each example and count what was kept.

    Items are token ids (every token a target) or (token ids, labels) pairs.
    Truncation keeps the start (the prompt) so the model still sees what the
    answer responds to. An example is skipped when fewer than 2 tokens remain
    or none of its labels after the first is a target (the first token is
    never predicted).
    """
    input_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    truncated = skipped = 0
    for item in token_ids:
        ids, labels = item if isinstance(item, tuple) else (item, item)
        if len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            truncated += 1
        if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
            skipped += 1
            continue
        input_ids.append(list(ids))
        all_labels.append(list(labels))
    return TokenizedExamples(
        input_ids=input_ids,
        labels=all_labels,
        num_tokens=sum(len(ids) for ids in input_ids),
        num_target_tokens=sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in all_labels),
        num_truncated=truncated,
        num_skipped=skipped,
    )


def tokenize_records(
    records: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
    *, completion_only: bool = False, prompt_style: str = PromptStyle.COMPLETION,
) -> TokenizedExamples:
    """encode_record_with_labels + collect_examples. Raises DataFormatError for a bad record."""
    return collect_examples(
        (encode_record_with_labels(r, tokenizer, completion_only=completion_only, prompt_style=prompt_style)
         for r in records), max_seq_length
    )


def record_lines(path: Path) -> list[int]:
    """The line numbers of a JSONL file's records (its non-blank lines), without parsing them.
    Raises OSError when the file cannot be read."""
    with path.open(encoding="utf-8") as f:
        return [line_no for line_no, line in enumerate(f, start=1) if line.strip()]


@dataclass(frozen=True)
class ValidationSplit:
    """Which records of a training file are held out for validation (training.validation_split).

    valid_lines are the held-out records' line numbers, train_lines the others'; both sorted.
    """

    train_lines: tuple[int, ...]
    valid_lines: tuple[int, ...]


def split_lines(lines: list[int], fraction: float, seed: int, *, name: str = "the training file") -> ValidationSplit:
    """Hold out ceil(len(lines) * fraction) of the record line numbers for validation, drawn by seed.

    The same lines, fraction and seed always give the same split (Python's random.Random is stable
    across versions for an int seed), so a retried or resumed job validates on the same records.
    Rounded up, as scikit-learn's train_test_split rounds a test fraction. Raises ValueError when
    either side would be empty.
    """
    n_valid = math.ceil(len(lines) * fraction)
    if n_valid < 1 or len(lines) - n_valid < 1:
        raise ValueError(
            f"training.validation_split {fraction} of {name}'s {len(lines)} record(s) leaves "
            f"{len(lines) - n_valid} for training and {n_valid} for validation; each side needs at least one: "
            f"upload more records, or give a validation_file instead")
    held = set(random.Random(seed).sample(lines, n_valid))
    return ValidationSplit(train_lines=tuple(n for n in lines if n not in held), valid_lines=tuple(sorted(held)))


def load_examples(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, *, completion_only: bool = False,
    prompt_style: str = PromptStyle.AUTO, lines: Collection[int] | None = None,
) -> TokenizedExamples:
    """tokenize_records for one JSONL file, code tasks laid out in `prompt_style` (training.prompt_style,
    whose default this is; prompt_style_for tells what it resolves to). With `lines`, only the records
    on those line numbers (one side of a ValidationSplit).

    Raises DataFormatError naming the file and line of the first bad record,
    ValueError when no record is usable, and OSError when the file cannot be read.
    """
    wanted = frozenset(lines) if lines is not None else None

    def encoded() -> Iterator[tuple[list[int], list[int]]]:
        for line_no, record in read_records(path):
            if wanted is not None and line_no not in wanted:
                continue
            try:
                yield encode_record_with_labels(record, tokenizer, completion_only=completion_only,
                                                prompt_style=prompt_style)
            except DataFormatError as e:
                raise DataFormatError(f"{path.name} line {line_no}: {e}") from e

    examples = collect_examples(encoded(), max_seq_length)
    if not examples.input_ids:
        part = " (of the records training.validation_split gave this side)" if wanted is not None else ""
        raise ValueError(
            f"{path.name}{part} has no usable records (each needs at least 2 tokens, and with completion_only_loss "
            f"a completion within the first {max_seq_length} tokens)"
        )
    return examples


class CausalLMCollator(DataCollatorForLanguageModeling):
    """DataCollatorForLanguageModeling(mlm=False) that masks padding by attention mask.

    The stock collator sets every label equal to pad_token_id to -100. With
    pad = eos (ensure_pad_token) that also hides each example's own final eos, so
    the model never learns to stop. Here only padded positions are ignored,
    and examples that carry "labels" (completion-only loss) keep them.
    Batches: input_ids, attention_mask, labels, all (batch, longest) int64.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        super().__init__(tokenizer=tokenizer, mlm=False)

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        given = [e["labels"] for e in examples] if all("labels" in e for e in examples) else None
        batch = super().torch_call([{"input_ids": e["input_ids"]} for e in examples])
        if given is None:
            labels = batch["input_ids"].clone()
        else:
            labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
            right = self.tokenizer.padding_side == "right"
            for row, example_labels in enumerate(given):
                n = len(example_labels)
                if right:
                    labels[row, :n] = torch.tensor(example_labels)
                else:
                    labels[row, labels.shape[1] - n:] = torch.tensor(example_labels)
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


class PackedCollator(DataCollatorWithFlattening):
    """Padding-free batches: the micro-batch's examples concatenated into one row.

    Returns input_ids, labels and position_ids, all (1, total tokens) int64,
    with position ids restarting at 0 for each example and the label of each
    example's first token set to -100, so no example predicts from the one
    before it. transformers derives a block-diagonal causal mask from the
    position ids (sdpa, eager) or passes the sequence boundaries to
    flash-attention (with_flash_attn_kwargs), so attention stays within an
    example and the loss equals that of the same examples padded.
    """

    def __init__(self, *, with_flash_attn_kwargs: bool = False):
        super().__init__(return_position_ids=True, separator_id=IGNORE_INDEX,
                         return_flash_attn_kwargs=with_flash_attn_kwargs)
