"""`tuneforge jobs follow ID`: a job's progress through the API until it ends, in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.factories import create_job, uploaded_file_id

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^\[[#-]{24}\] step (\d+)/(\d+)  loss \d+\.\d{4}  \d+ tok/s  ETA \S+$")


def _follow(job_id: str, *, key: str, api: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as a user runs it: no database settings, only the API's URL and the team's key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(TUNEFORGE_API_URL=api, TUNEFORGE_API_KEY=key)
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", "jobs", "follow", job_id, "--interval", "0.2"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def test_follow_shows_steps_until_the_job_succeeds_and_ends_with_its_status(api, make_team, worker, server):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), hyperparameters={"n_epochs": 1})
    done = _follow(job["id"], key=key, api=server)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    final = client.get(f"/fine_tuning/jobs/{job['id']}").json()
    assert lines[-1] == (f"job {job['id']} succeeded: model {final['fine_tuned_model']}, "
                         f"{final['trained_tokens']} trained tokens")
    steps = [tuple(map(int, m.groups())) for line in lines if (m := PROGRESS.match(line))]
    assert steps, done.stdout
    # Steps only go forward, and the bar ends full at the last one.
    assert [s for s, _ in steps] == sorted({s for s, _ in steps}) and steps[-1][0] == steps[-1][1]
    assert any(line.startswith("[info] ") for line in lines)  # the job's other events are shown too


def test_follow_exits_nonzero_for_a_cancelled_job(api, make_team, server, tiny_model):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client))
    assert client.post(f"/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    done = _follow(job["id"], key=key, api=server)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"job {job['id']} cancelled"


def test_follow_says_why_it_cannot_follow(make_team, server):
    _, key = make_team()
    missing = _follow("ftjob-nosuchjob", key=key, api=server)
    assert missing.returncode == 1 and missing.stderr.startswith("error: 404: "), missing.stderr
    refused = _follow("ftjob-nosuchjob", key="sk-wrong", api=server)
    assert refused.returncode == 1 and refused.stderr.startswith("error: 401: "), refused.stderr


def test_progress_line_shows_steps_loss_rate_and_eta():
    from tuneforge.follow import progress_line

    line = progress_line({"step": 6, "total_steps": 24, "loss": 1.23456, "tokens_per_second": 311.6,
                          "eta_seconds": 83.4})
    assert line == "[######------------------] step 6/24  loss 1.2346  312 tok/s  ETA 1m23s"
