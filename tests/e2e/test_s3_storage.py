"""With S3 storage selected, the API and a training worker share nothing but the network: each has
its own data dir, the blobs (the uploaded file, the base model, checkpoints, the adapter) live in
the bucket of a real S3-protocol server, and downloads stream through the API or redirect to a
presigned URL."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from app.core.config import Settings
from app.core.db import session_scope
from app.core.s3 import S3Storage
from app.domains.base_models import service as base_models
from tests.conftest import _stop, s3_storage_env, start_api, start_worker
from tests.factories import create_team, demo_tasks, files_under, wait_for_job

BASE = "tiny-llama-s3"


@pytest.fixture
def s3_stack(services_env, private_database, tiny_model, s3_server, tmp_path):
    """An API that streams downloads, an API that redirects them, and a training worker: three
    processes, three data dirs, one bucket."""
    tag = os.urandom(3).hex()
    s3_env = s3_storage_env(s3_server, f"e2e-{tag}")
    common = {**services_env, **s3_env, "TUNEFORGE_DATABASE_URL": private_database,
              "TUNEFORGE_TRAINING_QUEUE": f"training-s3-{tag}", "TUNEFORGE_EVALUATION_QUEUE": f"evaluation-s3-{tag}",
              "TUNEFORGE_WEBHOOKS__QUEUE": f"webhooks-s3-{tag}"}
    dirs = {name: tmp_path / name for name in ("api", "presigning-api", "worker")}
    storage = S3Storage.from_settings(Settings(
        data_dir=tmp_path / "registrar", storage_url=s3_env["TUNEFORGE_STORAGE_URL"], s3={
            "endpoint_url": s3_server, "region": "us-east-1", "addressing_style": "path",
            "access_key_id": s3_env["TUNEFORGE_S3__ACCESS_KEY_ID"],
            "secret_access_key": s3_env["TUNEFORGE_S3__SECRET_ACCESS_KEY"]}))
    with session_scope() as session:  # as `tuneforge models register --store` does
        base_models.register(session, name=BASE, path=tiny_model, storage=storage)
    procs = []
    try:
        api, api_url = start_api({**common, "TUNEFORGE_DATA_DIR": str(dirs["api"])}, tmp_path / "api.log")
        procs.append(api)
        presigning, presigning_url = start_api({**common, "TUNEFORGE_DATA_DIR": str(dirs["presigning-api"]),
                                                "TUNEFORGE_STORAGE__PRESIGNED_DOWNLOADS": "true",
                                                "TUNEFORGE_STORAGE__PRESIGN_SECONDS": "60"},
                                               tmp_path / "presigning-api.log")
        procs.append(presigning)
        procs.append(start_worker({**common, "TUNEFORGE_DATA_DIR": str(dirs["worker"])}, tmp_path / "worker.log",
                                  concurrency=1))
        yield {"api": api_url, "presigning": presigning_url, "storage": storage, "dirs": dirs, "s3": s3_server}
    finally:
        for proc in procs:
            _stop(proc)


def _objects(storage: S3Storage) -> list[str]:
    return sorted(name.removeprefix(f"{storage.prefix}/") for name in storage._list(""))


def test_a_job_trains_across_hosts_that_share_only_s3_and_its_adapter_downloads_byte_identical(s3_stack):
    storage: S3Storage = s3_stack["storage"]
    dirs = s3_stack["dirs"]
    team_id, key = create_team()
    client = openai.OpenAI(base_url=f"{s3_stack['api']}/v1", api_key=key, max_retries=0)
    api = httpx.Client(base_url=f"{s3_stack['api']}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    presigning = httpx.Client(base_url=f"{s3_stack['presigning']}/v1", headers={"Authorization": f"Bearer {key}"},
                              timeout=60)

    data = demo_tasks()
    uploaded = client.files.create(file=("tasks.jsonl", data), purpose="fine-tune")
    assert f"teams/{team_id}/files/{uploaded.id}.jsonl" in _objects(storage)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=uploaded.id, suffix="s3",
                                         hyperparameters={"n_epochs": 1})
    done = wait_for_job(api, job.id)
    assert done["status"] == "succeeded", done

    # The worker staged what it read into its own cache: the training file and the base model.
    staged = files_under(dirs["worker"] / "cache")
    assert f"teams/{team_id}/files/{uploaded.id}.jsonl" in staged
    assert any(p.startswith(f"models/{BASE}/") and p.endswith("/config.json") for p in staged)
    # Blobs live in the bucket only: neither process keeps a storage folder, and the API's spool is empty.
    for folder in dirs.values():
        assert not (folder / "storage").exists()
    assert files_under(dirs["api"] / "tmp") == [] and not (dirs["api"] / "cache").exists()

    adapter = api.get("/adapters").json()["data"][0]
    objects = _objects(storage)
    archive_key = next(o for o in objects if o.startswith(f"teams/{team_id}/adapters/{adapter['id']}/")
                       and o.endswith(".tar.gz"))
    with storage.open(archive_key) as f:
        stored = f.read()

    streamed = api.get(f"/adapters/{adapter['id']}/content")
    assert streamed.status_code == 200
    assert streamed.content == stored
    assert streamed.headers["x-adapter-sha256"] == hashlib.sha256(stored).hexdigest()
    assert streamed.headers["content-length"] == str(len(stored))
    with tarfile.open(fileobj=io.BytesIO(streamed.content)) as tar:
        config = json.load(tar.extractfile("adapter_config.json"))
    assert config["base_model_name_or_path"] == BASE

    redirect = presigning.get(f"/adapters/{adapter['id']}/content")
    assert redirect.status_code == 302
    location = redirect.headers["location"]
    assert urlsplit(location).netloc == urlsplit(s3_stack["s3"]).netloc and "X-Amz-Expires=60" in location
    fetched = httpx.get(location)  # no API key: the URL carries its own signature
    assert fetched.status_code == 200 and fetched.content == stored
    assert fetched.headers["content-disposition"] == f'attachment; filename="{adapter["id"]}.tar.gz"'

    # The official client follows the redirect (dropping its key for the other origin) to the file's bytes.
    presigned_client = openai.OpenAI(base_url=f"{s3_stack['presigning']}/v1", api_key=key, max_retries=0)
    assert presigned_client.files.content(uploaded.id).content == data
    assert client.files.content(uploaded.id).content == data

    # A missing blob is still the route's 404 in OpenAI's shape, not a redirect to S3's error.
    storage.delete(f"teams/{team_id}/files/{uploaded.id}.jsonl")
    missing = presigning.get(f"/files/{uploaded.id}/content")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "file_id"
    for c in (api, presigning):
        c.close()
