"""The structure of the code, read from its own imports: import cycles, the longest modules and
the longest functions of app/, worker/ and tuneforge/.

    python scripts/code_map.py            # report; exits 1 when there is an import cycle
    python scripts/code_map.py --json     # the same numbers as JSON

Two kinds of cycle are reported: between modules (a.py imports b.py, which imports a.py, at any
depth, including imports inside functions) and between the domains of app/domains (any module of
one domain importing any module of the other, both ways). Tests, migrations and bench are not read.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "worker", "tuneforge")
LONG_FUNCTION = 60


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            # The deepest known module the import names (a name imported from a module is not one).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


def domain_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    def domain(module: str) -> str | None:
        parts = module.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["app", "domains"] and len(parts) > 2 else None

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = domain(module)
        if source is None:
            continue
        out.setdefault(source, set())
        out[source] |= {d for t in targets if (d := domain(t)) and d != source}
    return out


def long_functions(known: dict[str, Path]) -> list[tuple[str, int]]:
    rows = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONG_FUNCTION:
                    rows.append((f"{name}:{node.name}", length))
    return sorted(rows, key=lambda r: -r[1])


def report() -> dict:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    sizes = sorted(((str(p.relative_to(ROOT)), len(p.read_text().splitlines())) for p in known.values()),
                   key=lambda r: -r[1])
    return {"module_cycles": cycles(graph), "domain_cycles": cycles(domain_graph(graph)),
            "longest_modules": sizes[:10], "modules_over_400_lines": sum(1 for _, n in sizes if n > 400),
            "functions_over_60_lines": long_functions(known)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = report()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for kind in ("module_cycles", "domain_cycles"):
            print(f"{kind.replace('_', ' ')}: {len(data[kind])}")
            for component in data[kind]:
                print("  " + " <-> ".join(component))
        print("longest modules:")
        for path, lines in data["longest_modules"]:
            print(f"  {lines:5d}  {path}")
        print(f"modules over 400 lines: {data['modules_over_400_lines']}")
        print(f"functions over {LONG_FUNCTION} lines: {len(data['functions_over_60_lines'])}")
        for name, lines in data["functions_over_60_lines"]:
            print(f"  {lines:5d}  {name}")
    return 1 if data["module_cycles"] or data["domain_cycles"] else 0


if __name__ == "__main__":
    sys.exit(main())
