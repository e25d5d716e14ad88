"""Dataset record formats and prompt layouts: the one definition that upload validation, training,
evaluation and serving share. Pure Python: no I/O, no model library, no web framework.

A JSONL file holds one JSON object per line, all of one format, told apart by their keys:

    chat               {"messages": [{"role": ..., "content": ...}, ...]}
    preference         {"input": {"messages": [...], "tools": [...]}, "preferred_output": [...],
                        "non_preferred_output": [...]}   (OpenAI's DPO format; "input" + either output)
    humaneval          {"prompt", "canonical_solution", "test", "entry_point"}   ("prompt" + any of the others)
    mbpp               {"text", "code", "test_list"}                            ("text" + "code" or "test_list")
    prompt_completion  {"prompt", "completion"}
    completions        {"task_id", "completion"}       (a model's outputs on code tasks, to be scored)
    text               {"text"}

checked in that order (detect). Other keys are allowed and ignored. A record of a format is valid
when it has every field that format requires, of the right type (problems; require raises).

A chat record is OpenAI's fine-tuning format: a message's content is a string or an array of text parts;
an assistant message may carry "weight" (0: no loss falls on it, 1: the default) and "tool_calls", and
then may leave its content null; a "tool" message answers an earlier call by its "tool_call_id"; the
record's top-level "tools" define the functions called. render_chat lays a conversation out, through a
tokenizer's chat template, as training and serving both read it.

A preference record is OpenAI's DPO format: the conversation so far ("input", its messages and tools as a
chat record has them) and two answers to it, each an array of one assistant message. Each answer must make
a valid chat record when appended to the input (preference_conversations); DPO jobs train on them, and
supervised jobs refuse them.

Prompt layouts: how a record becomes a prompt and the completion a model learns to write after it
(prompt_and_completion), the prompt an evaluation gives a model for a code task (task_prompt), and
the plain chat layout used wherever a tokenizer has no chat template (plain_chat, plain_chat_prompt,
plain_chat_template).

Code tasks are laid out in one of two prompt styles (PromptStyle): "completion", a plain text the
model continues with the solution (for base models: task_prompt, prompt_and_completion), or "chat",
the task as a user message (task_messages) answered by the reference code in a ```python fence
(task_answer), rendered through the tokenizer's chat template. "auto" is chat when the tokenizer has
a chat template (resolve_prompt_style). An MBPP task is shown with its tests in both styles, as the
MBPP paper prompts it, so the model knows the function's name and signature.

Normal forms, for telling whether two records hold the same task however they are written
(normalize_text: without case and layout; normalize_code: the parsed code without layout, comments
and docstrings, names kept).
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any


class RecordFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"
    MBPP = "mbpp"
    HUMANEVAL = "humaneval"
    COMPLETIONS = "completions"
    PREFERENCE = "preference"


FORMATS: tuple[RecordFormat, ...] = tuple(RecordFormat)
# Formats a fine-tuning job can learn from; "completions" is only scored by evaluations.
TRAINABLE_FORMATS: tuple[RecordFormat, ...] = (RecordFormat.CHAT, RecordFormat.PROMPT_COMPLETION, RecordFormat.TEXT,
                                               RecordFormat.MBPP, RecordFormat.HUMANEVAL)
# Formats an evaluation can take its code tasks from.
TASK_FORMATS: tuple[RecordFormat, ...] = (RecordFormat.MBPP, RecordFormat.HUMANEVAL)
CHAT_ROLES = ("system", "user", "assistant", "tool")

# The fields each format requires; problems() checks their types.
REQUIRED_FIELDS: dict[RecordFormat, tuple[str, ...]] = {
    RecordFormat.CHAT: ("messages",),
    RecordFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    RecordFormat.TEXT: ("text",),
    RecordFormat.MBPP: ("text", "code", "test_list"),
    RecordFormat.HUMANEVAL: ("prompt", "canonical_solution", "test", "entry_point"),
    RecordFormat.COMPLETIONS: ("task_id", "completion"),
    RecordFormat.PREFERENCE: ("input", "preferred_output", "non_preferred_output"),
}
# Formats a DPO job (method.type "dpo") learns from.
PREFERENCE_FORMATS: tuple[RecordFormat, ...] = (RecordFormat.PREFERENCE,)

SHAPES = ('{"messages": [{"role": ..., "content": ...}, ...]} (chat), '
          '{"prompt": ..., "completion": ...} (prompt_completion), '
          '{"task_id": ..., "completion": ...} (completions), '
          '{"text": ...} (text), '
          '{"text": ..., "code": ..., "test_list": [...]} (mbpp), '
          '{"prompt": ..., "canonical_solution": ..., "test": ..., "entry_point": ...} (humaneval), '
          '{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}], '
          '"non_preferred_output": [{"role": "assistant", ...}]} (preference)')

_NEEDS = {
    RecordFormat.HUMANEVAL: 'a humaneval record needs "prompt", "canonical_solution", "test" and "entry_point", '
                            "all non-empty strings",
    RecordFormat.MBPP: 'an mbpp record needs "text" and "code" (non-empty strings) and "test_list" '
                       "(a non-empty array of assert statements as strings)",
    RecordFormat.PROMPT_COMPLETION: 'a prompt_completion record needs "prompt" (a string) and "completion" '
                                    "(a non-empty string)",
    RecordFormat.TEXT: 'a text record needs "text" (a non-empty string)',
    RecordFormat.COMPLETIONS: 'a completions record needs "task_id" (a string or integer) and "completion" '
                              "(a string)",
}


class RecordInvalid(ValueError):
    """A record of no format, or one that breaks its format's requirements. `problems` lists each
    problem (what is wrong and how to fix it); the message joins them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# --- detection and requirements -----------------------------------------------------------------


def detect(record: Mapping[str, Any]) -> RecordFormat | None:
    """The format a record is written in, from its keys alone; None when no format's keys are there.

    Only the distinguishing keys decide, so an mbpp or humaneval record missing a field is detected
    as what it is and reported by problems(), instead of passing as plain text or prompt_completion.
    """
    if "messages" in record:
        return RecordFormat.CHAT
    if "input" in record and ("preferred_output" in record or "non_preferred_output" in record):
        return RecordFormat.PREFERENCE
    if "prompt" in record and any(key in record for key in REQUIRED_FIELDS[RecordFormat.HUMANEVAL][1:]):
        return RecordFormat.HUMANEVAL
    if "text" in record and ("code" in record or "test_list" in record):
        return RecordFormat.MBPP
    if "prompt" in record and "completion" in record:
        return RecordFormat.PROMPT_COMPLETION
    if "task_id" in record and "completion" in record:
        return RecordFormat.COMPLETIONS
    if "text" in record:
        return RecordFormat.TEXT
    return None


def problems(record: Mapping[str, Any], fmt: RecordFormat) -> list[str]:
    """Every way the record breaks the requirements of `fmt` (empty when it is valid), each message
    naming the field and saying how to fix it."""
    return _CHECKS[fmt](record)


def unknown_format(record: Mapping[str, Any]) -> str:
    """The problem of a record detect() finds no format for."""
    return (f"no dataset format matches this record's keys ({_keys(record)}); "
            f"write each line in one of these shapes: {SHAPES}")


def require(record: Mapping[str, Any], allowed: Sequence[RecordFormat] = FORMATS) -> RecordFormat:
    """The record's format, when it is valid and one of `allowed`. Raises RecordInvalid otherwise."""
    fmt = detect(record)
    if fmt is None:
        raise RecordInvalid([unknown_format(record)])
    if fmt not in allowed:
        raise RecordInvalid([f"this record is {fmt}; here a record must be one of {', '.join(allowed)}"])
    found = problems(record, fmt)
    if found:
        raise RecordInvalid(found)
    return fmt


def shown(value: Any) -> str:
    """A JSON value as an error message quotes it: objects and arrays by kind, long strings cut."""
    if isinstance(value, dict):
        return "an object" if value else "{}"
    if isinstance(value, list):
        return "an array" if value else "[]"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:56] + "...\""


def _keys(record: Mapping[str, Any]) -> str:
    if not record:
        return "none"
    keys = [json.dumps(key, ensure_ascii=False) for key in list(record)[:8]]
    return ", ".join(keys) + (", ..." if len(record) > 8 else "")


def _string(record: Mapping[str, Any], key: str, fmt: RecordFormat, found: list[str], *,
            non_empty: bool = True) -> None:
    if key not in record:
        found.append(f'"{key}" is missing; {_NEEDS[fmt]}')
        return
    value = record[key]
    if not isinstance(value, str) or (non_empty and not value):
        kind = "a non-empty string" if non_empty else "a string"
        found.append(f'"{key}" must be {kind}; got {shown(value)}')


def _check_chat(record: Mapping[str, Any]) -> list[str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return ['"messages" must be a non-empty array of {"role": ..., "content": ...} objects; '
                f"got {shown(messages)}"]
    found: list[str] = []
    tool_names = _tools_problems(record, found)
    # tool call id -> index of the assistant message that issued it; None for a call whose id is broken
    # (a tool message may be answering it: that call's error is enough)
    issued: dict[str | None, int] = {}
    learnable = weighted_out = False
    for i, message in enumerate(messages):
        path = f'"messages"[{i}]'
        if not isinstance(message, dict):
            found.append(f'{path} must be an object like {{"role": "user", "content": "..."}}; '
                         f"got {shown(message)}")
            continue
        role = message.get("role")
        if "role" not in message:
            found.append(f'{path}["role"] is missing; set it to one of {", ".join(CHAT_ROLES)}')
        elif not isinstance(role, str) or role not in CHAT_ROLES:
            found.append(f'{path}["role"] must be one of {", ".join(CHAT_ROLES)}; got {shown(role)}')
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None:
            found += _tool_call_problems(calls, role, path, issued, i, tool_names)
        calls_tools = role == "assistant" and isinstance(calls, list) and bool(calls)
        if content is None:
            if not (role == "assistant" and calls is not None):  # broken calls have an error of their own
                state = "null" if "content" in message else "missing"
                found.append(f'{path}["content"] is {state}; give it a string (only an assistant message '
                             'with "tool_calls" may leave it null)')
        elif not isinstance(content, str):
            found += _content_part_problems(content, path)
        if role == "tool" or "tool_call_id" in message:
            found += _tool_result_problems(message, role, path, issued)
        if "name" in message and not (isinstance(message["name"], str) and message["name"]):
            found.append(f'{path}["name"] must be a non-empty string; got {shown(message["name"])}')
        weight = message.get("weight", 1)
        if "weight" in message:
            if role != "assistant":
                found.append(f'{path}["weight"] is allowed only on assistant messages; remove it')
            elif type(weight) is not int or weight not in (0, 1):
                found.append(f'{path}["weight"] must be 0 or 1 (1 = learn from this message); '
                             f"got {shown(weight)}")
        if role == "assistant" and (content_text(content) or calls_tools):
            if weight == 0:
                weighted_out = True
            else:
                learnable = True
    if not found and not learnable:
        hint = ' or set "weight": 1 on one' if weighted_out else ""
        found.append('"messages" has no assistant message with non-empty content to learn from; add one '
                     f'like {{"role": "assistant", "content": "..."}}{hint}')
    return found


_TOOL_SHAPE = '{"type": "function", "function": {"name": "...", "description": "...", "parameters": {...}}}'
_CALL_SHAPE = '{"id": "...", "type": "function", "function": {"name": "...", "arguments": "{...}"}}'


def _tools_problems(record: Mapping[str, Any], found: list[str]) -> frozenset[str] | None:
    """Check a chat record's top-level "tools" (OpenAI's function definitions), appending to `found`;
    the names of the functions they define, or None when the record gives none or a broken one (calls
    are then not checked against them)."""
    if record.get("tools") is None:
        return None
    tools = record["tools"]
    if not isinstance(tools, list):
        found.append(f'"tools" must be an array of function definitions like {_TOOL_SHAPE}; got {shown(tools)}')
        return None
    names: set[str] = set()
    before = len(found)
    for j, tool in enumerate(tools):
        path = f'"tools"[{j}]'
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            found.append(f"{path} must be a function definition like {_TOOL_SHAPE}; got {shown(tool)}")
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name:
            found.append(f'{path}["function"]["name"] must be a non-empty string; got {shown(name)}')
        elif name in names:
            found.append(f'{path}["function"]["name"] {shown(name)} is defined twice; give each tool its own name')
        else:
            names.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            found.append(f'{path}["function"]["description"] must be a string; got {shown(function["description"])}')
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            found.append(f'{path}["function"]["parameters"] must be a JSON Schema object; '
                         f'got {shown(function["parameters"])}')
    # Calls are checked against the names only when every definition is sound (else their errors suffice).
    return frozenset(names) if tools and len(found) == before else None


def _tool_call_problems(calls: Any, role: Any, path: str, issued: dict[str | None, int], index: int,
                        tool_names: frozenset[str] | None) -> list[str]:
    """What is wrong with a message's "tool_calls"; records each valid call's id in `issued`."""
    if role != "assistant":
        return [f'{path}["tool_calls"] is allowed only on assistant messages; remove it']
    if not isinstance(calls, list) or not calls:
        issued[None] = index
        return [f'{path}["tool_calls"] must be a non-empty array of calls like {_CALL_SHAPE}; got {shown(calls)}']
    found: list[str] = []
    for j, call in enumerate(calls):
        at = f'{path}["tool_calls"][{j}]'
        if not isinstance(call, dict):
            found.append(f"{at} must be a call like {_CALL_SHAPE}; got {shown(call)}")
            continue
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            issued[None] = index
            found.append(f'{at}["id"] must be a non-empty string (the tool message answering it repeats it as '
                         f'"tool_call_id"); got {shown(call_id)}')
        elif call_id in issued:
            found.append(f'{at}["id"] {shown(call_id)} was already issued by "messages"[{issued[call_id]}]; '
                         "give each call its own id")
        else:
            issued[call_id] = index
        if call.get("type") != "function":
            found.append(f'{at}["type"] must be "function"; got {shown(call.get("type"))}')
        function = call.get("function")
        if not isinstance(function, dict):
            found.append(f'{at}["function"] must be an object like {{"name": "...", "arguments": "{{...}}"}}; '
                         f"got {shown(function)}")
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name:
            found.append(f'{at}["function"]["name"] must be a non-empty string; got {shown(name)}')
        elif tool_names is not None and name not in tool_names:
            found.append(f'{at}["function"]["name"] {shown(name)} is not one of the record\'s "tools" '
                         f"({', '.join(sorted(tool_names))}); define it there or call one of them")
        found += _arguments_problems(function.get("arguments"), f'{at}["function"]["arguments"]')
    return found


def _arguments_problems(arguments: Any, at: str) -> list[str]:
    if not isinstance(arguments, str):
        return [f'{at} must be a string holding a JSON object, as OpenAI writes it (e.g. "{{\\"city\\": '
                f'\\"Paris\\"}}"); got {shown(arguments)}']
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        return [f"{at} must be a string holding a JSON object; {shown(arguments)} does not parse as JSON"]
    if not isinstance(parsed, dict):
        return [f"{at} must be a string holding a JSON object; got the JSON {shown(parsed)}"]
    return []


def _tool_result_problems(message: Mapping[str, Any], role: Any, path: str,
                          issued: dict[str | None, int]) -> list[str]:
    """What is wrong with a tool message's "tool_call_id" (or with one on another role)."""
    if role != "tool":
        return [f'{path}["tool_call_id"] is allowed only on tool messages; remove it']
    call_id = message.get("tool_call_id")
    if "tool_call_id" not in message:
        return [f'{path}["tool_call_id"] is missing; a tool message answers a call: set it to the "id" of one of '
                'an earlier assistant message\'s "tool_calls"']
    if not isinstance(call_id, str) or not call_id:
        return [f'{path}["tool_call_id"] must be a non-empty string; got {shown(call_id)}']
    if call_id not in issued and None not in issued:
        ids = sorted(k for k in issued if k is not None)
        known = f" (issued so far: {', '.join(ids)})" if ids else " (none was issued before it)"
        return [f'{path}["tool_call_id"] {shown(call_id)} matches no call an earlier assistant message issued'
                f'{known}; set it to the "id" of the call this message answers']
    return []


def _content_part_problems(content: Any, path: str) -> list[str]:
    """What is wrong with a message's content that is not a string: it may be an array of OpenAI's text
    parts, [{"type": "text", "text": "..."}], and nothing else."""
    if not isinstance(content, list) or not content:
        return [f'{path}["content"] must be a string or a non-empty array of {{"type": "text", "text": "..."}} '
                f"parts; got {shown(content)}"]
    return [f'{path}["content"][{j}] must be a text part like {{"type": "text", "text": "..."}}; got {shown(part)}'
            for j, part in enumerate(content) if not _is_text_part(part)]


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _check_prompt_completion(record: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    _string(record, "prompt", RecordFormat.PROMPT_COMPLETION, found, non_empty=False)
    _string(record, "completion", RecordFormat.PROMPT_COMPLETION, found)
    return found


def _check_text(record: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    _string(record, "text", RecordFormat.TEXT, found)
    return found


def _check_mbpp(record: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    _string(record, "text", RecordFormat.MBPP, found)
    _string(record, "code", RecordFormat.MBPP, found)
    tests = record.get("test_list")
    if "test_list" not in record:
        found.append(f'"test_list" is missing; {_NEEDS[RecordFormat.MBPP]}')
    elif not isinstance(tests, list) or not tests:
        found.append('"test_list" must be a non-empty array of assert statements as strings; '
                     f"got {shown(tests)}")
    else:
        for i, test in enumerate(tests):
            if not isinstance(test, str) or not test:
                found.append(f'"test_list"[{i}] must be a non-empty string (an assert statement); '
                             f"got {shown(test)}")
    task_id = record.get("task_id")
    if "task_id" in record and (type(task_id) is not int and not isinstance(task_id, str)):
        found.append(f'"task_id" must be an integer or a string; got {shown(task_id)}')
    return found


def _check_humaneval(record: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    for key in REQUIRED_FIELDS[RecordFormat.HUMANEVAL]:
        _string(record, key, RecordFormat.HUMANEVAL, found)
    if "task_id" in record and not isinstance(record["task_id"], str):
        found.append(f'"task_id" must be a string like "HumanEval/0"; got {shown(record["task_id"])}')
    return found


def _check_completions(record: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    task_id = record.get("task_id")
    if type(task_id) is not int and not isinstance(task_id, str):
        found.append(f'"task_id" must be a string like "HumanEval/0" or an integer; got {shown(task_id)}')
    if not isinstance(record.get("completion"), str):
        found.append(f'"completion" must be a string (the code the model wrote); '
                     f'got {shown(record.get("completion"))}')
    return found


_PREFERENCE_OUTPUTS = ("preferred_output", "non_preferred_output")
_ANSWER_SHAPE = '[{"role": "assistant", "content": "..."}]'


def preference_conversations(record: Mapping[str, Any]) -> tuple[list[Any], list[Any], Any]:
    """(preferred conversation, non-preferred conversation, tools) of a valid preference record: each
    conversation is the input's messages followed by that answer's assistant message."""
    messages = list(record["input"]["messages"])
    return ([*messages, *record["preferred_output"]], [*messages, *record["non_preferred_output"]],
            record["input"].get("tools"))


def _check_preference(record: Mapping[str, Any]) -> list[str]:
    """Each answer appended to the input must be a valid chat record (_check_chat), its problems
    reported at the preference record's own paths."""
    given = record["input"]
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list) or not given["messages"]:
        return ['"input" must be an object with "messages", a non-empty array of {"role": ..., "content": ...} '
                f'objects (and optionally "tools"); got {shown(given)}']
    found: list[str] = []
    for key in ("input", *_PREFERENCE_OUTPUTS):
        if key not in record:
            found.append(f'"{key}" is missing; a preference record needs "input", "preferred_output" and '
                         '"non_preferred_output"')
    extra = sorted(set(given) - {"messages", "tools", "parallel_tool_calls"})
    if extra:
        found.append(f'"input" holds {", ".join(json.dumps(k) for k in extra)}; it takes "messages", "tools" and '
                     '"parallel_tool_calls" only')
    n = len(given["messages"])
    for key in _PREFERENCE_OUTPUTS:
        answer = record.get(key)
        if key not in record:
            continue
        if (not isinstance(answer, list) or len(answer) != 1 or not isinstance(answer[0], dict)
                or answer[0].get("role") != "assistant"):
            found.append(f'"{key}" must be an array of one assistant message like {_ANSWER_SHAPE}; got {shown(answer)}')
            continue
        if "weight" in answer[0]:
            found.append(f'"{key}"[0]["weight"] is not allowed: DPO learns from both answers; remove it')
            continue
        content, calls = answer[0].get("content"), answer[0].get("tool_calls")
        if not (isinstance(calls, list) and calls) and content_text(content) == "":
            found.append(f'"{key}"[0]["content"] is empty; give the answer some text (or "tool_calls")')
        chat = {"messages": [*given["messages"], answer[0]], **({"tools": given["tools"]} if "tools" in given else {})}
        for problem in _check_chat(chat):
            if problem.startswith('"messages" has no assistant message'):
                continue  # the answer's own emptiness is reported above
            problem = _at_preference_paths(problem, n, key)
            if problem not in found:
                found.append(problem)
    return found


def _at_preference_paths(problem: str, n_input: int, key: str) -> str:
    """A problem of the chat record _check_preference builds, at the preference record's paths."""
    def path(match: re.Match[str]) -> str:
        i = int(match.group(1))
        return f'"{key}"[0]' if i == n_input else f'"input"["messages"][{i}]'

    problem = re.sub(r'"messages"\[(\d+)\]', path, problem)
    return re.sub(r'(^|[^\]])"tools"', lambda m: f'{m.group(1)}"input"["tools"]', problem)


_CHECKS = {
    RecordFormat.CHAT: _check_chat,
    RecordFormat.PREFERENCE: _check_preference,
    RecordFormat.PROMPT_COMPLETION: _check_prompt_completion,
    RecordFormat.TEXT: _check_text,
    RecordFormat.MBPP: _check_mbpp,
    RecordFormat.HUMANEVAL: _check_humaneval,
    RecordFormat.COMPLETIONS: _check_completions,
}


# --- normal forms -------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Text as compared for sameness: casefolded, every run of whitespace one space, ends trimmed."""
    return " ".join(text.casefold().split())


def normalize_code(code: str) -> str | None:
    """Python code as compared for sameness: parsed and unparsed (ast.unparse), so layout, quoting,
    redundant parentheses and comments do not count, with the docstring of the module and of every
    class and function left out; names are kept. None when the code does not parse (an indented
    body alone is dedented first) or holds no statement."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        try:
            tree = ast.parse(textwrap.dedent(code))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
    if not tree.body:
        return None
    try:
        return ast.unparse(tree)
    except (RecursionError, ValueError):
        return None


# --- prompt layouts -----------------------------------------------------------------------------


class PromptStyle(StrEnum):
    """How a code task is put to a model; AUTO resolves to one of the others (resolve_prompt_style)."""

    AUTO = "auto"
    CHAT = "chat"
    COMPLETION = "completion"


def resolve_prompt_style(requested: str, *, has_chat_template: bool) -> PromptStyle:
    """What a requested prompt style is for a tokenizer: auto is chat when the tokenizer has a chat
    template and completion when it has none; chat and completion stay as they are (chat without a
    template uses the plain chat layout). Raises ValueError for another value."""
    style = PromptStyle(requested)
    if style == PromptStyle.AUTO:
        return PromptStyle.CHAT if has_chat_template else PromptStyle.COMPLETION
    return style


def mbpp_prompt(record: Mapping[str, Any]) -> str:
    """An MBPP task as the MBPP paper prompts it: the description, then the tests its code must pass
    (which name the function and show its signature)."""
    tests = "\n".join(record["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {record['text']} "
            f"Your code should pass these tests:\n\n{tests}\n")


def prompt_and_completion(record: Mapping[str, Any], fmt: RecordFormat) -> tuple[str, str]:
    """(prompt, completion) of a valid record of any trainable format but chat: the text a model reads
    and the text it learns to write after it, in the completion style. Plain text is all completion
    (an empty prompt); an mbpp task's prompt is mbpp_prompt, its completion the reference code."""
    if fmt == RecordFormat.TEXT:
        return "", record["text"]
    if fmt == RecordFormat.HUMANEVAL:
        return task_prompt(record, fmt), record["canonical_solution"]
    if fmt == RecordFormat.PROMPT_COMPLETION:
        return record["prompt"], record["completion"]
    if fmt == RecordFormat.MBPP:
        return task_prompt(record, fmt), record["code"]
    raise ValueError(f"a {fmt} record has no prompt/completion layout")


def task_prompt(record: Mapping[str, Any], fmt: RecordFormat) -> str:
    """The completion-style prompt an evaluation gives a model for a code task (mbpp or humaneval): the
    prompt of the task's training example, so a model is evaluated on what it was trained to continue.
    Reads only what the prompt shows (not the reference solution)."""
    _require_task(fmt)
    return mbpp_prompt(record) if fmt == RecordFormat.MBPP else record["prompt"]


def task_messages(record: Mapping[str, Any], fmt: RecordFormat) -> list[dict[str, str]]:
    """The chat-style prompt of a code task: one user message. An mbpp task is mbpp_prompt; a humaneval
    task asks for a self-contained script completing its prompt (the signature and docstring), in a
    fenced block, as evalplus asks an instruct model."""
    _require_task(fmt)
    if fmt == RecordFormat.MBPP:
        content = mbpp_prompt(record)
    else:
        content = ("Please provide a self-contained Python script that solves the following problem in a "
                   f"markdown code block:\n```python\n{record['prompt'].strip()}\n```\n")
    return [{"role": "user", "content": content}]


def task_answer(record: Mapping[str, Any], fmt: RecordFormat) -> str:
    """The chat-style answer a model learns for a code task: its reference solution, whole (a humaneval
    task's prompt and canonical solution together), in a ```python fence."""
    _require_task(fmt)
    code = record["code"] if fmt == RecordFormat.MBPP else record["prompt"] + record["canonical_solution"]
    code = code.strip("\n").rstrip()
    return f"```python\n{code}\n```"


def task_conversation(record: Mapping[str, Any], fmt: RecordFormat) -> list[dict[str, str]]:
    """A code task as the chat a model trains on: task_messages, then task_answer as the assistant's turn."""
    return [*task_messages(record, fmt), {"role": "assistant", "content": task_answer(record, fmt)}]


def _require_task(fmt: RecordFormat) -> None:
    if fmt not in TASK_FORMATS:
        raise ValueError(f"a {fmt} record is no code task; tasks are one of {', '.join(TASK_FORMATS)}")


# The plain chat layout, for tokenizers without a chat template: each turn is a role tag on a line
# of its own, then the content and a newline; a prompt ends with the assistant's tag opened.
_TURN_OPEN = "<|{role}|>\n"


def chat_turn_open(role: str) -> str:
    """The line that opens a turn of `role` in the plain chat layout."""
    return _TURN_OPEN.format(role=role)


def plain_chat(messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The messages in the plain chat layout, and the character spans [start, end) of each assistant
    turn's content with its newline (what a model learns to write). Every message needs a string
    "role" and "content"; raises RecordInvalid otherwise."""
    require_text_messages(messages)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in messages:
        head, body = chat_turn_open(m["role"]), f"{m['content']}\n"
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += [head, body]
        pos += len(head) + len(body)
    return "".join(parts), spans


def plain_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The plain chat layout of the messages with the assistant's turn opened: what a model trained on
    that layout continues with its answer. Raises RecordInvalid like plain_chat."""
    return plain_chat(messages)[0] + chat_turn_open("assistant")


def plain_chat_template(end_of_turn: str = "") -> str:
    """The plain chat layout as a Jinja chat template, with `end_of_turn` written after each turn's
    content (before its newline); with none it renders what plain_chat and plain_chat_prompt write."""
    return ("{% for m in messages %}" + chat_turn_open("{{ m['role'] }}") + "{{ m['content'] }}" + end_of_turn
            + "\n{% endfor %}{% if add_generation_prompt %}" + chat_turn_open("assistant") + "{% endif %}")


# The message fields a chat template is given besides role and content, as the message has them.
TEMPLATE_FIELDS = ("name", "tool_calls", "tool_call_id")


def content_text(content: Any) -> str | None:
    """A message's content as text: a string as it is, an array of text parts ([{"type": "text",
    "text": ...}]) as their texts joined; None for anything else (null content, other parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple) and content and all(_is_text_part(p) for p in content):
        return "".join(p["text"] for p in content)
    return None


def template_messages(messages: Any) -> Any:
    """Chat messages as a chat template (or the plain chat layout) receives them: the one definition
    training and serving both render through, so a prompt is laid out the same on both sides. Each
    message keeps its role, its content as text (content_text: text parts joined) and, where given,
    its name and tool fields (TEMPLATE_FIELDS); keys only training reads (weight) are left out.
    Content that is neither text nor text parts stays as it is, for require_text_messages to refuse;
    what is not a list of objects is returned unchanged, likewise."""
    if not isinstance(messages, list | tuple) or not all(isinstance(m, Mapping) for m in messages):
        return messages
    out = []
    for m in messages:
        text = content_text(m.get("content"))
        turn = {"role": m.get("role"), "content": m.get("content") if text is None else text}
        turn.update({k: m[k] for k in TEMPLATE_FIELDS if m.get(k) is not None})
        out.append(turn)
    return out


def require_text_messages(messages: Any) -> None:
    """What a layout needs of chat messages: a non-empty list of objects with a string "role" and a
    string "content" (an assistant's null content with tool_calls has no text to lay out). Raises
    RecordInvalid otherwise."""
    if not isinstance(messages, list | tuple) or not messages:
        raise RecordInvalid(["'messages' must be a non-empty list of {role, content} objects"])
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordInvalid([f"each message needs string 'role' and 'content', got {m!r:.200}"])


# --- tool calls -----------------------------------------------------------------------------------
# A chat record in OpenAI's tool format has top-level "tools" (function definitions), assistant messages
# with "tool_calls" ({"id", "type": "function", "function": {"name", "arguments": a JSON string}}) and
# "tool" messages answering a call by its "tool_call_id". A chat template that takes tools (it reads the
# `tools` variable, as transformers templates with tool support do) renders them itself, with each
# call's arguments as an object. For any other template, and for the plain chat layout, they are
# written as text: the plain tool layout (plain_tool_messages), Hermes/Qwen's convention, where a call
# is {"name": ..., "arguments": {...}} in JSON between TOOL_CALL_OPEN and TOOL_CALL_CLOSE, the form a
# model trained on it writes and serving parses out of its answer.

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads the `tools` variable)."""
    return bool(template) and "tools" in str(template)


def tool_call_text(name: str, arguments: Any) -> str:
    """One call in the tagged form; arguments as an object, or a JSON string of one (as OpenAI writes them)."""
    return (f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': _call_arguments(arguments)})}\n"
            f"{TOOL_CALL_CLOSE}")


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system text that offers `tools` (OpenAI function tools) to a model whose template has no tool
    support: each function's definition as one line of JSON, and how to call one."""
    functions = "\n".join(json.dumps(t.get("function", t)) for t in tools)
    return ("You may call one or more functions to answer. The functions, as JSON schemas:\n"
            f"{functions}\n"
            f"To call a function, write a JSON object with its name and arguments between {TOOL_CALL_OPEN} and "
            f'{TOOL_CALL_CLOSE}, for example:\n{TOOL_CALL_OPEN}\n{{"name": "function_name", "arguments": '
            f'{{"arg": "value"}}}}\n{TOOL_CALL_CLOSE}')


def plain_tool_messages(messages: Sequence[Mapping[str, Any]],
                        tools: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Messages for a template (or the plain chat layout) without tool support, the same in training and
    serving: an assistant's calls appended to its content (after a newline, when it has text) in the
    tagged form (tool_call_text), a null content without calls as "", tool_call_id dropped (a tool
    message's content is its result), and the tools offered (tools_prompt) after the first message's
    content when that is a system or developer message, else in a system message of their own first."""
    out: list[dict[str, Any]] = []
    for m in messages:
        turn = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        content = m.get("content")
        calls = [tool_call_text(c["function"]["name"], c["function"].get("arguments"))
                 for c in m.get("tool_calls") or ()]
        if content is None or calls:
            turn["content"] = "\n".join([content, *calls] if isinstance(content, str) and content else calls)
        out.append(turn)
    if tools:
        offer = tools_prompt(tools)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{offer}"}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out


def native_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with tool support: each call's arguments as an object, as those templates
    render them (OpenAI writes a JSON string)."""
    out = []
    for m in messages:
        turn = dict(m)
        if m.get("tool_calls"):
            turn["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _call_arguments(
                c["function"].get("arguments"))}} for c in m["tool_calls"]]
        out.append(turn)
    return out


def _call_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def render_chat(tokenizer: Any, messages: Any, tools: Sequence[Mapping[str, Any]] | None = None, *,
                add_generation_prompt: bool = False, chat_template: str | None = None) -> str:
    """The text of a conversation as a model reads it: the one rendering training and serving share.

    The messages are first given the fields a template gets (template_messages). With a chat template
    (`chat_template`, else the tokenizer's) that supports tools (template_supports_tools), the tool
    calls and `tools` go to it natively (native_tool_messages, tokenizer.apply_chat_template(tools=));
    with one that does not, or with none, they are laid out as text first (plain_tool_messages). Without
    any template the result is the plain chat layout (plain_chat; plain_chat_prompt when
    add_generation_prompt), to which training appends the eos token. `tokenizer` is anything with
    transformers' apply_chat_template and chat_template. Raises RecordInvalid when a message the plain
    chat layout gets lacks a string role or content; a template's own errors propagate."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or None
    turns = template_messages(messages)
    # Every message needs a string role and content; an assistant's calls may stand in for its content.
    require_text_messages(turns if not isinstance(turns, list) else [
        {**m, "content": ""} if isinstance(m, Mapping) and m.get("content") is None and m.get("tool_calls") else m
        for m in turns])
    if template_supports_tools(template):
        turns, given = native_tool_messages(turns), (list(tools) if tools else None)
    else:
        turns, given = plain_tool_messages(turns, tools), None
    if template is None:
        return plain_chat_prompt(turns) if add_generation_prompt else plain_chat(turns)[0]
    return tokenizer.apply_chat_template(turns, tools=given, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
