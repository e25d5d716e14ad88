"""`tuneforge demo` on the embedded default: SQLite and the filesystem broker, no server configured."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_the_whole_path_without_postgres_or_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    data_dir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "tuneforge.cli", "demo", "--data-dir", str(data_dir),
                          "--model", "tiny", "--pretrain-steps", "0"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The generated line is printed as its repr: double-quoted when the random model wrote a quote.
    assert re.search(r"^    generated: (['\"])def add\(", out.stdout, re.M), out.stdout[-3000:]
    assert "Demo finished" in out.stdout
    # The job is followed as `tuneforge jobs follow` shows it: a full progress bar, then its final status.
    assert re.search(r"^    \[#{24}\] step (\d+)/\1  loss ", out.stdout, re.M), out.stdout[-3000:]
    assert re.search(r"^    job ftjob-\S+ succeeded: model ft:tiny-llama:", out.stdout, re.M), out.stdout[-3000:]
    db = sqlite3.connect(data_dir / "tuneforge.db")
    statuses = db.execute("SELECT status FROM fine_tuning_job").fetchall()
    adapters = db.execute("SELECT count(*) FROM adapter").fetchone()[0]
    assert statuses == [("succeeded",)] and adapters == 1
    # Everything the embedded broker writes stays under the data dir.
    assert not (tmp_path / "control").exists() and (data_dir / "broker").is_dir()
