"""Typed factories for test data, through the project's own services."""

from __future__ import annotations

import json
import secrets
import time
from importlib import resources
from pathlib import Path

import httpx

from app.core.db import session_scope
from app.domains.jobs.states import FINAL
from app.domains.teams import service as teams


def create_team(name: str | None = None) -> tuple[str, str]:
    with session_scope() as session:
        team, key = teams.create_team(session, name=name or f"team-{secrets.token_hex(4)}")
        return team.id, key


def demo_tasks() -> bytes:
    return resources.files("tuneforge.data").joinpath("demo_tasks.jsonl").read_bytes()


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def upload(client: httpx.Client, content: bytes, *, filename: str = "data.jsonl", purpose: str = "fine-tune",
           headers: dict | None = None) -> httpx.Response:
    return client.post("/files", data={"purpose": purpose}, files={"file": (filename, content, "application/jsonl")},
                       headers=headers)


def uploaded_file_id(client: httpx.Client, content: bytes | None = None) -> str:
    r = upload(client, content if content is not None else demo_tasks())
    assert r.status_code == 200, r.text
    return r.json()["id"]


def post_job(client: httpx.Client, file_id: str, **body) -> httpx.Response:
    """POST /fine_tuning/jobs for tiny-llama on file_id, whatever the answer."""
    return client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **body})


def create_job(client: httpx.Client, file_id: str, **body) -> dict:
    r = post_job(client, file_id, **body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_job(client: httpx.Client, job_id: str, statuses=FINAL, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.2)


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of the job, oldest first, walking the pages."""
    events, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return list(reversed(events))
        after = page["data"][-1]["id"]


def stored_adapter(team_id: str, archive: Path) -> str:
    """An adapter of tiny-llama whose archive is the given file, recorded without training; its id."""
    from app.core.ids import new_id
    from app.core.storage import get_storage
    from app.domains.adapters import service as adapters

    adapter_id = new_id("ftadapter")
    prefix = adapters.storage_prefix(team_id=team_id, adapter_id=adapter_id)
    blob = get_storage().put_file(archive, adapters.archive_key(prefix))
    with session_scope() as session:
        adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=None, base_model="tiny-llama",
                        name=f"ft:tiny-llama:{adapter_id}", storage_prefix=prefix, archive_key=blob.key,
                        size=blob.bytes, sha256=blob.sha256)
    return adapter_id
