"""Checks for the bundled code tasks: the pool (data/code_tasks_train.jsonl and
data/code_tasks_heldout.jsonl) and its easy tier (data/code_tasks_easy_train.jsonl and
data/code_tasks_easy_heldout.jsonl).

A task is an MBPP-style record {"task_id", "text", "code", "test_list"}. The checks:

- shape: the four keys and nothing else; an integer task_id from 1001 to 2000 in the pool and
  from 2001 in the easy tier (clear of each other and of the demo tasks' ids); a one-sentence
  text "Write a function to ..."; code that defines exactly one top-level function; three
  assert lines that call it (the tests are how a model learns the name); at least a minimum
  count of tasks in each of the four splits;
- references: every reference solution passes its own tests in the evaluation sandbox, through
  the same harness an evaluation uses;
- overlap: no two tasks, across the four splits and the demo tasks, share a task id, a text, a
  wording (the same content words), a function name or a solution; no function name is a
  HumanEval entry point and no text is close to a HumanEval prompt;
- behaviour (in the sandbox): no reference of ours passes every test of another of our tasks;
  no task of ours and demo task, and no task of ours and HumanEval problem, solve each other's
  tests; every reference runs its tests in under 50 ms.

Every check returns a list of messages, empty when all holds; check_all() runs them all.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "code_tasks_train.jsonl"
HELDOUT_FILE = DATA_DIR / "code_tasks_heldout.jsonl"
EASY_TRAIN_FILE = DATA_DIR / "code_tasks_easy_train.jsonl"
EASY_HELDOUT_FILE = DATA_DIR / "code_tasks_easy_heldout.jsonl"
DEMO_FILE = DATA_DIR / "demo_tasks.jsonl"

MIN_TRAIN = 200
MIN_HELDOUT = 50
MIN_EASY_TRAIN = 100
MIN_EASY_HELDOUT = 50
FIRST_TASK_ID = 1001
# The easy tier's ids start here; the pool's stay below.
FIRST_EASY_TASK_ID = 2001
EASY_SPLITS = ("easy_train", "easy_heldout")
TESTS_PER_TASK = 3
KEYS = ("task_id", "text", "code", "test_list")
MAX_SECONDS_PER_TASK = 0.05
# A text whose content words overlap this much (Jaccard) with those of a HumanEval prompt's
# first sentence counts as a copy of it.
HUMANEVAL_WORD_OVERLAP = 0.6
# How long one candidate may take on another task's tests in the behaviour check before it
# counts as not passing (a wrong function on foreign input may run for ever); how long a
# reference may take on its own tests before it counts as failing them; and how many tasks
# share one sandboxed program.
CANDIDATE_LIMIT_S = 0.02
OWN_LIMIT_S = 1.0
TASKS_PER_PROGRAM = 40
CROSS_TIMEOUT_S = 120.0

# Words that say nothing about which problem a text states.
_STOPWORDS = frozenset({
    "a", "an", "the", "to", "of", "in", "on", "for", "and", "or", "by", "with", "from", "as", "at",
    "into", "is", "are", "be", "it", "its", "each", "every", "all", "that", "which", "whose",
    "whether", "when", "than", "then", "this", "these", "those", "one", "two", "write", "function",
    "return", "returns", "given", "list", "string", "number", "numbers",
})


@dataclass(frozen=True)
class Task:
    task_id: int
    text: str
    code: str
    test_list: tuple[str, ...]
    split: str  # "train", "heldout", "easy_train", "easy_heldout" or "demo"

    @property
    def key(self) -> str:
        return f"demo/{self.task_id}" if self.split == "demo" else str(self.task_id)

    @property
    def entry_point(self) -> str | None:
        return entry_point(self.code)


# --------------------------------------------------------------------------- loading


def load_tasks(path: Path, split: str) -> tuple[list[Task], list[str]]:
    """The tasks of one JSONL file, and a message for each line that is not a task record at
    all (bad JSON, missing keys, wrong types); such lines are left out of the tasks."""
    tasks, problems = [], []
    if not path.exists():
        return [], [f"{path}: missing"]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path.name}:{number}"
        if not line.strip():
            problems.append(f"{where}: blank line; the file must hold one JSON object per line")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        bad = _type_problems(row, strict=split != "demo")
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        tasks.append(Task(row["task_id"], row["text"], row["code"], tuple(row["test_list"]), split))
    return tasks, problems


def _type_problems(row: dict, *, strict: bool) -> str | None:
    if strict and set(row) != set(KEYS):
        return f"keys must be exactly {list(KEYS)}, got {sorted(row)}"
    if not isinstance(row.get("task_id"), int) or isinstance(row.get("task_id"), bool):
        return '"task_id" must be an integer'
    for key in ("text", "code"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f'"{key}" must be a non-empty string'
    tests = row.get("test_list")
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        return '"test_list" must be a list of strings'
    return None


class Bundle(NamedTuple):
    """The tasks of every bundled file, and the problems found while reading them."""

    train: list[Task]
    heldout: list[Task]
    easy_train: list[Task]
    easy_heldout: list[Task]
    demo: list[Task]
    problems: list[str]

    @property
    def ours(self) -> list[Task]:
        """The tasks written for this project: both splits of the pool and of the easy tier."""
        return [*self.train, *self.heldout, *self.easy_train, *self.easy_heldout]


def load_bundle(train: Path = TRAIN_FILE, heldout: Path = HELDOUT_FILE, easy_train: Path = EASY_TRAIN_FILE,
                easy_heldout: Path = EASY_HELDOUT_FILE, demo: Path = DEMO_FILE) -> Bundle:
    """The tasks of the pool's and the easy tier's splits and the demo tasks, and the problems
    found while reading them."""
    train_tasks, p1 = load_tasks(train, "train")
    heldout_tasks, p2 = load_tasks(heldout, "heldout")
    easy_train_tasks, p3 = load_tasks(easy_train, "easy_train")
    easy_heldout_tasks, p4 = load_tasks(easy_heldout, "easy_heldout")
    demo_tasks, p5 = load_tasks(demo, "demo")
    return Bundle(train_tasks, heldout_tasks, easy_train_tasks, easy_heldout_tasks, demo_tasks,
                  p1 + p2 + p3 + p4 + p5)


# --------------------------------------------------------------------------- shape


def entry_point(code: str) -> str | None:
    """The name of the one top-level function `code` defines, or None when it defines none,
    several, or does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    return names[0] if len(names) == 1 else None


def shape_problems(tasks: Iterable[Task]) -> list[str]:
    problems = []
    for task in tasks:
        where = f"task {task.task_id} ({task.split})"
        problems += [f"{where}: {p}" for p in _id_problems(task)]
        problems += [f"{where}: {p}" for p in _text_problems(task.text)]
        problems += [f"{where}: {p}" for p in _code_problems(task)]
    return problems


def _id_problems(task: Task) -> list[str]:
    if task.split in EASY_SPLITS:
        if task.task_id < FIRST_EASY_TASK_ID:
            return [f"task_id must be >= {FIRST_EASY_TASK_ID} in the easy tier, clear of the pool's and "
                    "the demo tasks' ids"]
    elif task.task_id < FIRST_TASK_ID:
        return [f"task_id must be >= {FIRST_TASK_ID}, clear of the demo tasks' ids"]
    elif task.task_id >= FIRST_EASY_TASK_ID:
        return [f"task_id must be < {FIRST_EASY_TASK_ID} in the pool, clear of the easy tier's ids"]
    return []


def _text_problems(text: str) -> list[str]:
    out = []
    if not text.startswith("Write a function to "):
        out.append('text must start with "Write a function to "')
    if not text.endswith(".") or "\n" in text or re.search(r"[.!?]\s+[A-Z]", text):
        out.append("text must be one sentence ending with a full stop")
    return out


def _code_problems(task: Task) -> list[str]:
    try:
        tree = ast.parse(task.code)
    except SyntaxError as exc:
        return [f"code does not parse: {exc.msg} (line {exc.lineno})"]
    out = []
    others = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.Import | ast.ImportFrom)]
    if others:
        out.append("code may hold only imports and one function at the top level")
    name = task.entry_point
    if name is None:
        return out + ["code must define exactly one top-level function"]
    if len(task.test_list) != TESTS_PER_TASK:
        out.append(f"test_list must hold {TESTS_PER_TASK} assert lines, has {len(task.test_list)}")
    for i, test in enumerate(task.test_list):
        try:
            body = ast.parse(test).body
        except SyntaxError as exc:
            out.append(f"test_list[{i}] does not parse: {exc.msg}")
            continue
        if len(body) != 1 or not isinstance(body[0], ast.Assert) or not test.startswith("assert "):
            out.append(f"test_list[{i}] must be a single assert statement")
        elif name not in _called_names(body[0]):
            out.append(f"test_list[{i}] must call {name}(), so the tests show the function's name")
    return out


def _called_names(node: ast.AST) -> set[str]:
    return {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def count_problems(train: Sequence[Task], heldout: Sequence[Task], easy_train: Sequence[Task],
                   easy_heldout: Sequence[Task]) -> list[str]:
    out = []
    for label, tasks, minimum in (("training split", train, MIN_TRAIN),
                                  ("held-out split", heldout, MIN_HELDOUT),
                                  ("easy training split", easy_train, MIN_EASY_TRAIN),
                                  ("easy held-out split", easy_heldout, MIN_EASY_HELDOUT)):
        if len(tasks) < minimum:
            out.append(f"the {label} has {len(tasks)} tasks, fewer than {minimum}")
    return out


# --------------------------------------------------------------------------- overlap


def normalized_text(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def wording(text: str) -> tuple[str, ...]:
    """The text's content words in order, lightly stemmed: two texts with the same wording say
    the same thing with different filler."""
    words = []
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _STOPWORDS:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if len(word) > len(suffix) + 2 and word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        words.append(word)
    return tuple(words)


def normalized_code(code: str) -> str | None:
    """The code's syntax tree with the function renamed, so a solution copied under another
    name still compares equal; None when it does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    name = entry_point(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            node.name = "_f"
        elif isinstance(node, ast.Name) and node.id == name:
            node.id = "_f"
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def _name_key(name: str) -> str:
    return name.replace("_", "").lower()


def overlap_problems(ours: Sequence[Task], demo: Sequence[Task], humaneval: dict) -> list[str]:
    """Duplicates among our tasks (every split of the pool and the easy tier) and with the demo
    tasks; names and texts that match HumanEval. `humaneval` maps task ids to
    harness.HumanEvalProblem."""
    out = []
    seen_ids: dict[int, Task] = {}
    for task in ours:
        if task.task_id in seen_ids:
            out.append(f"task_id {task.task_id} is used twice ({seen_ids[task.task_id].split} and {task.split})")
        seen_ids[task.task_id] = task
    for label, key in (("text", lambda t: normalized_text(t.text)),
                       ("wording", lambda t: wording(t.text)),
                       ("function name", lambda t: _name_key(t.entry_point or f"?{t.key}")),
                       ("solution", lambda t: normalized_code(t.code) or f"?{t.key}")):
        first: dict[object, Task] = {}
        for task in [*demo, *ours]:
            k = key(task)
            if k in first and task.split != "demo":
                other = first[k]
                out.append(f"task {task.key} ({task.split}) has the same {label} as task {other.key} "
                           f"({other.split}): {task.text!r} / {other.text!r}")
            first.setdefault(k, task)
    he_names = {_name_key(p.entry_point): p.task_id for p in humaneval.values()}
    he_words = {task_id: set(wording(_first_sentence(p.prompt))) for task_id, p in humaneval.items()}
    for task in ours:
        name = task.entry_point or ""
        if _name_key(name) in he_names:
            out.append(f"task {task.key}: function name {name!r} is the entry point of {he_names[_name_key(name)]}")
        words = set(wording(task.text))
        for task_id, theirs in he_words.items():
            if words and len(words & theirs) / len(words | theirs) >= HUMANEVAL_WORD_OVERLAP:
                out.append(f"task {task.key}: text is close to the prompt of {task_id}: {task.text!r}")
    return out


def _first_sentence(prompt: str) -> str:
    """The first sentence of a HumanEval prompt's docstring (its task statement)."""
    match = re.search(r'("""|\'\'\')(.*?)(\1|$)', prompt, flags=re.DOTALL)
    doc = match.group(2) if match else prompt
    doc = " ".join(doc.split())
    return re.split(r"(?<=[.!?])\s", doc, maxsplit=1)[0]


# --------------------------------------------------------------------------- sandboxed checks


def make_sandbox(*, allow_weak: bool = False):
    """The evaluation sandbox: bubblewrap where it works here; the weak one only when allowed.
    Raises SandboxUnavailable saying how to get one."""
    from worker.evaluation.sandbox import Sandbox, SandboxLimits

    return Sandbox(SandboxLimits(timeout_s=CROSS_TIMEOUT_S), mode="auto", allow_weak_sandbox=allow_weak)


def reference_problems(sandbox, tasks: Sequence[Task]) -> list[str]:
    """Run every task's reference solution against its tests, as an evaluation scores an MBPP
    completion (worker.evaluation.harness), and report each one that does not pass."""
    from worker.evaluation.harness import MbppProblem, Sample, score

    if not tasks:
        return []
    # Keyed by position: a task id used twice is reported by overlap_problems, not here.
    problems = {str(i): MbppProblem(task_id=str(i), test_list=t.test_list, reference_code=t.code)
                for i, t in enumerate(tasks)}
    result = score(sandbox, [Sample(str(i), t.code) for i, t in enumerate(tasks)], problems=problems, ks=(1,))
    return [f"task {tasks[int(r.task_id)].key}: the reference solution does not pass its tests ({r.outcome}): "
            f"{r.detail.strip()[-400:]}" for r in result.results if not r.passed]


_CROSS_PROGRAM = r'''
import json, signal, time


class _Timeout(BaseException):
    pass


ARMED = False


def _alarm(signum, frame):
    if ARMED:
        raise _Timeout()


signal.signal(signal.SIGALRM, _alarm)


def guarded(fn, limit):
    """True when fn() returns within `limit` seconds; any exception, or running late, is False.
    An alarm that lands after fn() returned (while disarming) is ignored or counted as late."""
    global ARMED
    try:
        ARMED = True
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            fn()
        finally:
            ARMED = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        return True
    except BaseException:
        ARMED = False
        return False


DATA = json.loads(%(data)r)
LIMIT, OWN_LIMIT = DATA["limit"], DATA["own_limit"]
candidates = {}
for key, source, name in DATA["candidates"]:
    namespace = {}
    try:
        exec(source, namespace)
        candidates[key] = namespace[name]
    except BaseException:
        pass
checks = {}
for key, source in DATA["checks"]:
    namespace = {}
    try:
        exec(source, namespace)
        checks[key] = namespace["check"]
    except BaseException:
        pass

same, solves, timings = [], [], {}
for task in DATA["tasks"]:
    key, name = task["key"], task["name"]
    compiled = [compile(test, "<test>", "exec") for test in task["tests"]]

    def passes(fn, limit=LIMIT):
        namespace = {name: fn}
        return guarded(lambda: [exec(code, namespace) for code in compiled], limit)

    own = candidates.get(key)
    if own is not None and task["time"]:
        best = None
        for _ in range(3):
            start = time.perf_counter()
            ok = passes(own, OWN_LIMIT)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
        timings[key] = [ok, best]
    for other, fn in candidates.items():
        if other != key and other in task["against"] and passes(fn):
            same.append([other, key])
    if own is not None and task["humaneval"]:
        for he_key, check in checks.items():
            if guarded(lambda: check(own), LIMIT):
                solves.append([key, he_key])
print(json.dumps({"same": same, "solves": solves, "timings": timings}))
'''


def behaviour_problems(sandbox, ours: Sequence[Task], demo: Sequence[Task], humaneval: dict) -> list[str]:
    """In the sandbox: every reference of ours passes its tests, deterministically and in under
    MAX_SECONDS_PER_TASK, and no two tasks are the same problem under another name:

    - no reference of ours passes every test of another of our tasks;
    - no task of ours and HumanEval problem, and no task of ours and demo task, solve each
      other's tests, both ways: their tests are not written to tell our problems apart (the demo
      tasks have one or two tests; a HumanEval check may pass a function written for another
      problem that happens to accept a list where it expects a string), so one way alone is
      too weak a sign.

    A candidate that raises or runs past CANDIDATE_LIMIT_S on a task's tests does not pass them."""
    # One task per key: a task id used twice is reported by overlap_problems.
    ours = list({t.key: t for t in reversed(ours)}.values())[::-1]
    ours_keys = {t.key for t in ours}
    demo_keys = {t.key for t in demo}
    he_candidates = [[tid, p.prompt + p.canonical_solution, p.entry_point] for tid, p in humaneval.items()]
    candidates = [[t.key, t.code, t.entry_point] for t in [*ours, *demo] if t.entry_point] + he_candidates
    checks = [[tid, p.test] for tid, p in humaneval.items()]
    everything = sorted({c[0] for c in candidates})
    bearers = [{"key": t.key, "name": t.entry_point, "tests": list(t.test_list), "time": True,
                "humaneval": True, "against": everything} for t in ours if t.entry_point]
    bearers += [{"key": t.key, "name": t.entry_point, "tests": list(t.test_list), "time": False,
                 "humaneval": False, "against": sorted(ours_keys)} for t in demo if t.entry_point]
    same: set[tuple[str, str]] = set()
    solves: set[tuple[str, str]] = set()
    out: list[str] = []
    for start in range(0, len(bearers), TASKS_PER_PROGRAM):
        chunk = bearers[start:start + TASKS_PER_PROGRAM]
        report, problem = _run_cross(sandbox, candidates, checks, chunk)
        if problem:
            out.append(problem)
            continue
        same |= {(other, key) for other, key in report["same"]}
        solves |= {(key, he_key) for key, he_key in report["solves"]}
        for key, (ok, seconds) in report["timings"].items():
            if not ok:
                out.append(f"task {key}: the reference fails its tests in the behaviour check "
                           "(wrong, or not deterministic)")
            elif seconds > MAX_SECONDS_PER_TASK:
                out.append(f"task {key}: the reference takes {seconds * 1000:.0f} ms on its tests, "
                           f"over {MAX_SECONDS_PER_TASK * 1000:.0f} ms")
    texts = {t.key: t.text for t in [*ours, *demo]}
    for other, key in sorted(same):
        if key in demo_keys:
            if (key, other) in same:
                out.append(f"task {other} and demo task {key} solve each other's tests, the same problem "
                           f"({texts[other]!r} / {texts[key]!r}); drop task {other}")
        elif other in ours_keys:
            out.append(f"the reference of task {other} passes every test of task {key}, the same problem? "
                       f"({texts[other]!r} / {texts[key]!r}); drop one, or add a test that tells them apart")
        elif other not in demo_keys and (key, other) in solves:
            out.append(f"task {key} and {other} solve each other's tests: a HumanEval problem "
                       f"({texts[key]!r}); drop it")
    return out


def _run_cross(sandbox, candidates: list, checks: list, chunk: list[dict]) -> tuple[dict, str | None]:
    data = json.dumps({"limit": CANDIDATE_LIMIT_S, "own_limit": OWN_LIMIT_S, "candidates": candidates,
                       "checks": checks, "tasks": chunk})
    result = sandbox.run(_CROSS_PROGRAM % {"data": data}, timeout_s=CROSS_TIMEOUT_S)
    if result.status != "passed":
        detail = f"{result.detail} {result.stderr.strip()[-400:]}".strip()
        return {}, (f"the behaviour check of tasks {chunk[0]['key']}..{chunk[-1]['key']} did not finish "
                    f"({result.status}): {detail}")
    return json.loads(result.stdout), None


# --------------------------------------------------------------------------- all of it


def static_problems(bundle: Bundle) -> list[str]:
    from worker.evaluation.harness import load_humaneval

    ours = bundle.ours
    return (shape_problems(ours)
            + count_problems(bundle.train, bundle.heldout, bundle.easy_train, bundle.easy_heldout)
            + overlap_problems(ours, bundle.demo, load_humaneval()))


def sandbox_problems(sandbox, bundle: Bundle) -> list[str]:
    from worker.evaluation.harness import load_humaneval

    ours = bundle.ours
    return reference_problems(sandbox, ours) + behaviour_problems(sandbox, ours, bundle.demo, load_humaneval())


def check_all(sandbox=None, *, allow_weak: bool = False) -> tuple[dict[str, int], list[str]]:
    """Load the bundle and run every check. Returns the counts per split and every problem."""
    bundle = load_bundle()
    problems = bundle.problems + static_problems(bundle)
    sandbox = sandbox or make_sandbox(allow_weak=allow_weak)
    problems += sandbox_problems(sandbox, bundle)
    counts = {"train": len(bundle.train), "heldout": len(bundle.heldout), "easy_train": len(bundle.easy_train),
              "easy_heldout": len(bundle.easy_heldout), "demo": len(bundle.demo)}
    return counts, problems
