"""Constrained decoding with llguidance: a request's response_format or forced tool call becomes a
grammar, each of its rows gets a matcher of its own, and at every step the engine masks each
constrained row's logits to the tokens its matcher allows, so the output always parses.

    grammars = Grammars(tokenizer, vocab_size=..., eos_ids=...)
    constraint = grammars.constraint(response_format={"type": "json_object"})   # None: unconstrained
    matcher = grammars.matcher(constraint)          # one per row
    grammars.mask(logits, [(row, matcher), ...])    # logits (rows, vocab) float32, in place
    matcher.consume_token(token)                    # after choosing; is_stopped(): the grammar is done

Why llguidance: it installs as one self-contained wheel (no dependencies, so torch stays as pinned),
compiles JSON schemas and Lark grammars (tool calls are a Lark rule around a JSON schema) against a
transformers fast tokenizer, computes each row's token bitmask on the CPU in microseconds, and the
mask is applied with plain torch ops on whichever device holds the logits (CPU or CUDA).

JSON is constrained to compact separators (", " and ": ") with no free whitespace: a model that is
unsure what to write could otherwise fill its whole budget with spaces.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.domains.serving.tools import CALL_CLOSE, CALL_OPEN
from worker.inference.errors import GenerationInvalid

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
SCHEMA_PARAM = "response_format.json_schema.schema"


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: an llguidance grammar (the serialized form its grammar_from_*
    functions return) and the request field it came from, which errors name."""

    grammar: str
    param: str


def json_grammar(schema: Mapping[str, Any] | None) -> str:
    """The grammar of JSON text matching `schema` (any JSON object when None)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema) if schema is not None else {"type": "object"},
                                                         overrides=JSON_OPTIONS)  # type: ignore[arg-type]


def call_schema(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call, {"name": ..., "arguments": {...}}, of the named function or any of `tools`
    (OpenAI function tools), its arguments matching that function's parameters."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _compact(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema with JSON_OPTIONS as its x-guidance (how a Lark grammar's %json takes compile options)."""
    return {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


def tool_call_lark(tools: Sequence[Mapping[str, Any]], name: str | None, *, parallel: bool,
                   answer_schema: Mapping[str, Any] | None = None, free_answer: bool = False) -> str:
    """A Lark grammar of one tagged call (or several, with `parallel`), optionally or a JSON answer matching
    `answer_schema` instead (tool_choice auto with a response_format)."""
    calls = "call (\"\\n\" call)*" if parallel else "call"
    body = json.dumps(_compact(call_schema(tools, name)))
    start = f"start: {calls}"
    if free_answer:
        start += " | answer"
    lines = [start, f"call: {_lark_string(CALL_OPEN + chr(10))} body {_lark_string(chr(10) + CALL_CLOSE)}",
             f"body: %json {body}"]
    if free_answer:
        lines.append(f"answer: %json {json.dumps(_compact(answer_schema or {'type': 'object'}))}")
    return "\n".join(lines) + "\n"


class Grammars:
    """Compiles constraints against one tokenizer and masks logits with them. The llguidance tokenizer is built
    on first use (about a second for a large vocabulary). Thread-safe: requests are checked on the callers'
    threads, rows are masked on the engine's."""

    def __init__(self, tokenizer, *, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer = None
        self._executor = None
        self._checked: dict[str, str] = {}  # grammar -> "" or its error, bounded (see check)

    def _llg(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self.vocab_size,
                        eos_token=self._eos_ids[0] if len(self._eos_ids) == 1 else (self._eos_ids or None))
                except ValueError as exc:  # a slow (Python) tokenizer
                    raise GenerationInvalid(f"Structured output needs a fast tokenizer for this model: {exc}.",
                                            param="response_format") from None
                self._executor = llguidance.LLExecutor()
            return self._tokenizer

    def constraint(self, *, response_format: Mapping[str, Any] | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str | Mapping[str, Any] | None = None,
                   parallel_tool_calls: bool | None = None) -> Constraint | None:
        """The constraint of a request (None: unconstrained), compiled and checked against the tokenizer.
        response_format: OpenAI's text / json_object / json_schema; tools with tool_choice "required" or a
        named function force a call; with "auto" and a response_format the answer is a call or that JSON.
        Raises GenerationInvalid naming the field whose schema or value cannot be used."""
        import llguidance

        fmt = (response_format or {}).get("type", "text")
        if fmt not in ("text", "json_object", "json_schema"):
            raise GenerationInvalid(f"response_format.type must be text, json_object or json_schema, got {fmt!r}.",
                                    param="response_format.type")
        schema: Mapping[str, Any] | None = None
        if fmt == "json_schema":
            schema = ((response_format or {}).get("json_schema") or {}).get("schema")
            if schema is None:
                schema = {}
            if not isinstance(schema, Mapping):
                raise GenerationInvalid("response_format.json_schema.schema must be a JSON schema object.",
                                        param=SCHEMA_PARAM)
        forced: str | None = None
        choice = tool_choice or "auto"
        if tools and choice != "none":
            if isinstance(choice, Mapping):
                forced = choice["function"]["name"]
            elif choice == "required":
                forced = ""
        if forced is not None:
            assert tools is not None
            # A named function is one call of it; "required" may make several unless parallel_tool_calls is false.
            lark = tool_call_lark(tools, forced or None, parallel=not forced and parallel_tool_calls is not False)
            return self._checked_constraint(llguidance.LLMatcher.grammar_from_lark(lark), "tools", tools)
        if fmt == "text":
            return None
        if tools and choice == "auto":
            lark = tool_call_lark(tools, None, parallel=parallel_tool_calls is not False,
                                  answer_schema=schema if fmt == "json_schema" else None, free_answer=True)
            return self._checked_constraint(llguidance.LLMatcher.grammar_from_lark(lark), "tools", tools, schema)
        param = SCHEMA_PARAM if fmt == "json_schema" else "response_format"
        try:
            grammar = json_grammar(schema)
        except ValueError as exc:
            raise GenerationInvalid(f"The JSON schema cannot be used: {exc}.", param=param) from None
        return self._check(Constraint(grammar, param))

    def _checked_constraint(self, grammar: str, param: str, tools: Sequence[Mapping[str, Any]],
                            schema: Mapping[str, Any] | None = None) -> Constraint:
        """A tool grammar, checked; when it does not compile, the error names the tool whose parameters
        (or the response schema) fail on their own."""
        try:
            return self._check(Constraint(grammar, param))
        except GenerationInvalid:
            pass
        for i, tool in enumerate(tools):
            parameters = tool["function"].get("parameters")
            if parameters is not None:
                self._check(Constraint(json_grammar(parameters), f"tools.{i}.function.parameters"))
        if schema is not None:
            self._check(Constraint(json_grammar(schema), SCHEMA_PARAM))
        return self._check(Constraint(grammar, param))

    def _check(self, constraint: Constraint) -> Constraint:
        import llguidance

        tokenizer = self._llg()
        with self._lock:
            error = self._checked.get(constraint.grammar)
        if error is None:
            error = llguidance.LLMatcher.validate_grammar(constraint.grammar, tokenizer)
            with self._lock:
                if len(self._checked) >= 1024:
                    self._checked.pop(next(iter(self._checked)))
                self._checked[constraint.grammar] = error
        if error and not error.startswith("WARNING"):
            raise GenerationInvalid(f"The schema cannot be compiled into a grammar: {error}", param=constraint.param)
        return constraint

    def matcher(self, constraint: Constraint):
        """A fresh llguidance LLMatcher for one row. Raises GenerationInvalid when the grammar fails to build."""
        import llguidance

        matcher = llguidance.LLMatcher(self._llg(), constraint.grammar, log_level=0)
        if matcher.is_error():
            raise GenerationInvalid(f"The schema cannot be compiled into a grammar: {matcher.get_error()}",
                                    param=constraint.param)
        return matcher

    def mask(self, logits, rows: Sequence[tuple[int, Any]]) -> None:
        """Set to -inf, in place, every logit of rows[i][0] that its matcher rows[i][1] does not allow next.
        logits: (rows, vocab) float32 on any device. The bitmask (one bit per token, 32 tokens per int32)
        is computed for all rows in parallel on the CPU, then unpacked on the logits' device."""
        import torch
        from llguidance.torch import fill_next_token_bitmask_par

        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, (_, m) in enumerate(rows)], bitmask)
        bits = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((bitmask.to(logits.device, non_blocking=True).unsqueeze(-1) >> bits) & 1).bool()
        allowed = allowed.reshape(len(rows), words * 32)[:, :logits.shape[1]]
        index = torch.tensor([r for r, _ in rows], device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
