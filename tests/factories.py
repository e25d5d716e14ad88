"""Typed factories for test data, through the project's own services."""

from __future__ import annotations

import json
import secrets
import time
from importlib import resources
from pathlib import Path

import httpx
import psutil

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


def job_with_checkpoint_models(client: httpx.Client, team_id: str, checkpoint_dirs: dict[int, Path],
                               adapter_dir: Path) -> tuple[str, str]:
    """A job of tiny-llama, cancelled before it ran, that has a checkpoint at each step with that directory
    stored as its files (as the trainer stores a checkpoint: the adapter at that step, plus an optimizer
    state the engine must not read), and a fine-tuned model whose adapter is adapter_dir. Returns
    (job id, the job's fine-tuned model name)."""
    import io
    import tarfile

    from app.core.ids import new_id
    from app.core.storage import get_storage
    from app.domains.adapters import service as adapters
    from app.domains.checkpoints import service as checkpoints
    from app.domains.jobs import service as jobs
    from app.domains.teams.models import Team

    job = create_job(client, uploaded_file_id(client), suffix="ckpt")
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")  # only its row is needed, not a run
    storage = get_storage()
    adapter_id = new_id("ftadapter")
    prefix = adapters.storage_prefix(team_id=team_id, adapter_id=adapter_id)
    storage.put_tree(adapter_dir, adapters.files_prefix(prefix))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(adapter_dir, arcname=".")
    archive = adapter_dir.parent / f"{adapter_dir.name}-{adapter_id}.tar.gz"
    archive.write_bytes(buffer.getvalue())
    blob = storage.put_file(archive, adapters.archive_key(prefix))
    with session_scope() as session:
        row = jobs.get(session, team_id=team_id, job_id=job["id"])
        team = session.get(Team, team_id)
        assert team is not None
        name = jobs.model_name(base=row.model, team_name=team.name, suffix=row.suffix, job_id=row.id)
        adapters.create(session, adapter_id=adapter_id, team_id=team_id, job_id=row.id, base_model=row.model,
                        name=name, storage_prefix=prefix, archive_key=blob.key, size=blob.bytes, sha256=blob.sha256)
        for step, src in checkpoint_dirs.items():
            ckpt_prefix = checkpoints.storage_prefix(team_id=team_id, job_id=row.id, step=step)
            storage.put_tree(src, ckpt_prefix)
            (scratch := src.parent / f"{src.name}-optimizer").mkdir(exist_ok=True)
            (scratch / "optimizer.pt").write_bytes(b"not a pickle the engine may load")
            storage.put_tree(scratch, ckpt_prefix)
            checkpoints.record(session, job_id=row.id, team_id=team_id, step=step, metrics={"train_loss": 1.0},
                               prefix=ckpt_prefix, size=1)
    return job["id"], name


def files_under(folder: Path) -> list[str]:
    """The relative paths of the files under folder (its subfolders' too), sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def training_ranks(pid: int, *, recursive: bool = False) -> set[int]:
    """The live training ranks (worker.training.rank_process, ranks 1..N-1) among pid's children (all
    descendants when recursive); the other children a test process has (the session's API, worker and
    S3 server) are not."""
    try:
        children = psutil.Process(pid).children(recursive=recursive)
    except psutil.NoSuchProcess:
        return set()
    ranks = set()
    for child in children:
        try:  # a zombie's command line raises ZombieProcess, a NoSuchProcess
            if "worker.training.rank_process" in " ".join(child.cmdline()):
                ranks.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return ranks
