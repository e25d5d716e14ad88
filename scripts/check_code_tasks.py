"""Check the bundled code tasks (the pool's and the easy tier's splits): shape, every reference
solution passing its tests in the evaluation sandbox, and no duplicates or overlap with the demo
tasks or HumanEval.

    python scripts/check_code_tasks.py [--allow-weak-sandbox]

Exits 0 when every check holds, 1 listing every problem otherwise, 2 when no sandbox can run
here. The checks themselves live in tuneforge/tasks_check.py (the tests call them too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneforge import tasks_check
from worker.evaluation.errors import SandboxUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-weak-sandbox", action="store_true",
                        help="run the references without bubblewrap when it is unavailable here")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        counts, problems = tasks_check.check_all(allow_weak=args.allow_weak_sandbox)
    except SandboxUnavailable as exc:
        print(f"cannot check the references: {exc.message}", file=sys.stderr)
        return 2
    print(f"train: {counts['train']} tasks, held-out: {counts['heldout']} tasks, "
          f"easy train: {counts['easy_train']} tasks, easy held-out: {counts['easy_heldout']} tasks "
          f"(checked against {counts['demo']} demo tasks and HumanEval's 164) "
          f"in {time.monotonic() - start:.1f} s")
    if problems:
        print(f"{len(problems)} problems:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("ok: shapes valid, every reference passes its tests in the sandbox, no duplicates, no overlap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
