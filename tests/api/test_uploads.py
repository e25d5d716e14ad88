"""Multipart uploads (/v1/uploads): parts streamed to storage, assembled in the order given, checked
(bytes, md5, part ids) and validated like any upload into one File; cancel and expiry delete parts."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from app.core.db import session_scope, utcnow
from app.domains.files.models import File
from app.domains.uploads.models import Upload, UploadPart
from tests.api.servers import embedded_instance, private_api
from tests.conftest import TEST_UPLOAD_LIMIT, _stop, start_api, wait_until
from tests.factories import demo_tasks, jsonl, wait_for_job

CHAT = jsonl([{"messages": [{"role": "user", "content": f"question {i}"},
                            {"role": "assistant", "content": f"answer {i}"}]} for i in range(40)])


@pytest.fixture
def oai(server, make_team):
    team_id, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client, team_id, key
    client.close()


def _parts_dir(services_env, team_id: str, upload_id: str) -> Path:
    return Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage" / "teams" / team_id / "uploads" / upload_id


def _new(client: openai.OpenAI, content: bytes, **overrides):
    params = {"bytes": len(content), "filename": "data.jsonl", "mime_type": "application/jsonl",
              "purpose": "fine-tune", **overrides}
    return client.uploads.create(**params)


def _send(client: openai.OpenAI, upload_id: str, content: bytes, size: int) -> list[str]:
    return [client.uploads.parts.create(upload_id=upload_id, data=content[i:i + size]).id
            for i in range(0, len(content), size)]


def _error(exc: openai.APIStatusError) -> dict:
    """The error object of the answer (the client hands over the body's "error")."""
    assert isinstance(exc.body, dict), exc.body
    return exc.body.get("error", exc.body)


def _team_files(team_id: str) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(File).where(File.team_id == team_id))


def test_upload_file_chunked_past_the_single_request_limit_becomes_a_file_a_job_trains_on(
        services_env, make_team, worker, tiny_model, tmp_path):
    content = demo_tasks()
    limit = len(content) // 3  # the single-request limit of this API: the file is three times that
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(content)
    _, key = make_team()
    proc, base = start_api({**services_env, "TUNEFORGE_UPLOAD_MAX_BYTES": str(limit)}, tmp_path / "api.log")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=("tasks.jsonl", content), purpose="fine-tune")
        assert refused.value.status_code == 413

        done = client.uploads.upload_file_chunked(file=path, mime_type="application/jsonl", purpose="fine-tune",
                                                  part_size=limit, md5=hashlib.md5(content).hexdigest())
        assert done.status == "completed" and done.bytes == len(content) and done.filename == "tasks.jsonl"
        assert done.object == "upload" and done.expires_at == done.created_at + 3600
        file = done.file
        assert file is not None and file.id.startswith("file-") and file.bytes == len(content)
        assert file.purpose == "fine-tune" and client.files.retrieve(file.id).id == file.id
        assert client.files.content(file.id).content == content  # byte-identical

        job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=file.id,
                                             hyperparameters={"n_epochs": 1})
        assert job.training_file == file.id
        finished = wait_for_job(httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}),
                                job.id)
        assert finished["status"] == "succeeded", finished
        assert finished["trained_tokens"] > 0
    finally:
        client.close()
        _stop(proc)


def test_parts_are_assembled_in_the_order_complete_lists_them(oai, services_env):
    client, team_id, _ = oai
    first, second = CHAT[:1000], CHAT[1000:]
    upload = _new(client, CHAT)
    assert upload.status == "pending" and upload.file is None and upload.id.startswith("upload-")
    late = client.uploads.parts.create(upload_id=upload.id, data=second)  # sent first, assembled last
    early = client.uploads.parts.create(upload_id=upload.id, data=first)
    assert late.object == "upload.part" and late.upload_id == upload.id
    assert len(list(_parts_dir(services_env, team_id, upload.id).iterdir())) == 2

    done = client.uploads.complete(upload_id=upload.id, part_ids=[early.id, late.id])
    assert done.status == "completed" and done.file is not None
    assert client.files.content(done.file.id).content == CHAT
    assert done.file.sha256 == hashlib.sha256(CHAT).hexdigest() and done.file.examples == 40
    assert not _parts_dir(services_env, team_id, upload.id).exists()  # the parts became the file
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(UploadPart)
                              .where(UploadPart.upload_id == upload.id)) == 0


def test_a_wrong_md5_is_refused_and_the_upload_stays_pending(oai):
    client, team_id, _ = oai
    upload = _new(client, CHAT)
    parts = _send(client, upload.id, CHAT, 1024)
    with pytest.raises(openai.BadRequestError) as wrong:
        client.uploads.complete(upload_id=upload.id, part_ids=parts, md5=hashlib.md5(b"other").hexdigest())
    error = _error(wrong.value)
    assert error["param"] == "md5" and error["code"] == "md5_mismatch"
    assert hashlib.md5(CHAT).hexdigest() in error["message"]
    with pytest.raises(openai.BadRequestError) as malformed:
        client.uploads.complete(upload_id=upload.id, part_ids=parts, md5="not-hex")
    assert _error(malformed.value)["param"] == "md5"
    assert _team_files(team_id) == 0

    done = client.uploads.complete(upload_id=upload.id, part_ids=parts, md5=hashlib.md5(CHAT).hexdigest().upper())
    assert done.status == "completed" and _team_files(team_id) == 1


def test_parts_that_do_not_add_up_to_bytes_are_refused(oai):
    client, _, _ = oai
    upload = _new(client, CHAT)
    head = client.uploads.parts.create(upload_id=upload.id, data=CHAT[:-10])
    with pytest.raises(openai.BadRequestError) as short:
        client.uploads.complete(upload_id=upload.id, part_ids=[head.id])
    error = _error(short.value)
    assert error["param"] == "part_ids" and error["code"] == "bytes_mismatch"
    assert f"{len(CHAT) - 10} bytes" in error["message"] and str(len(CHAT)) in error["message"]

    with pytest.raises(openai.BadRequestError) as over:  # 11 more bytes would pass `bytes`
        client.uploads.parts.create(upload_id=upload.id, data=CHAT[-11:])
    assert _error(over.value)["param"] == "data"
    with pytest.raises(openai.BadRequestError) as empty:
        client.uploads.parts.create(upload_id=upload.id, data=b"")
    assert _error(empty.value)["code"] == "empty_part"

    tail = client.uploads.parts.create(upload_id=upload.id, data=CHAT[-10:])
    with pytest.raises(openai.BadRequestError) as twice:
        client.uploads.complete(upload_id=upload.id, part_ids=[head.id, tail.id, tail.id])
    assert _error(twice.value)["param"] == "part_ids.2"
    assert client.uploads.complete(upload_id=upload.id, part_ids=[head.id, tail.id]).status == "completed"


def test_an_unknown_part_id_or_another_uploads_part_is_refused_naming_it(oai):
    client, team_id, _ = oai
    upload = _new(client, CHAT)
    other = _new(client, CHAT)
    mine = client.uploads.parts.create(upload_id=upload.id, data=CHAT)
    theirs = client.uploads.parts.create(upload_id=other.id, data=CHAT)
    for part_ids, param in (([mine.id, "part-0000000000000000deadbeef"], "part_ids.1"), ([theirs.id], "part_ids.0")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.uploads.complete(upload_id=upload.id, part_ids=part_ids)
        error = _error(refused.value)
        assert error["param"] == param and error["code"] == "unknown_part", error
    assert _team_files(team_id) == 0
    # Each upload still completes with its own part.
    assert client.uploads.complete(upload_id=other.id, part_ids=[theirs.id]).status == "completed"
    assert client.uploads.complete(upload_id=upload.id, part_ids=[mine.id]).status == "completed"


def test_completing_twice_is_a_conflict_and_makes_one_file(oai):
    client, team_id, _ = oai
    upload = _new(client, CHAT)
    parts = _send(client, upload.id, CHAT, 700)
    done = client.uploads.complete(upload_id=upload.id, part_ids=parts)
    with pytest.raises(openai.ConflictError) as again:
        client.uploads.complete(upload_id=upload.id, part_ids=parts)
    error = _error(again.value)
    assert error["code"] == "upload_not_pending" and "completed" in error["message"]
    assert done.file is not None and done.file.id in error["message"]
    with pytest.raises(openai.ConflictError):
        client.uploads.parts.create(upload_id=upload.id, data=b"more")
    with pytest.raises(openai.ConflictError):
        client.uploads.cancel(upload.id)
    assert _team_files(team_id) == 1


def test_cancel_deletes_the_parts_and_ends_the_upload(oai, services_env):
    client, team_id, _ = oai
    upload = _new(client, CHAT)
    parts = _send(client, upload.id, CHAT, 1000)
    assert _parts_dir(services_env, team_id, upload.id).is_dir()
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled" and cancelled.file is None and cancelled.id == upload.id
    assert not _parts_dir(services_env, team_id, upload.id).exists()
    with pytest.raises(openai.ConflictError) as late:
        client.uploads.complete(upload_id=upload.id, part_ids=parts)
    assert "cancelled" in _error(late.value)["message"]
    with pytest.raises(openai.ConflictError):
        client.uploads.parts.create(upload_id=upload.id, data=CHAT)
    with pytest.raises(openai.ConflictError):
        client.uploads.cancel(upload.id)
    assert _team_files(team_id) == 0


def _status(upload_id: str) -> str:
    with session_scope() as session:
        return session.get(Upload, upload_id).status


def test_the_reaper_expires_a_pending_upload_past_its_hour_and_deletes_its_parts(oai, services_env):
    from worker.reaper import expire_uploads

    client, team_id, _ = oai
    upload = _new(client, CHAT)
    parts = _send(client, upload.id, CHAT, 1000)
    fresh = _new(client, CHAT)
    _send(client, fresh.id, CHAT, 1000)
    with session_scope() as session:  # the first upload was created more than an hour ago
        row = session.get(Upload, upload.id)
        row.expires_at = utcnow() - dt.timedelta(seconds=1)

    # Before the reaper runs, the upload already refuses parts and completion as expired.
    with pytest.raises(openai.ConflictError) as early:
        client.uploads.complete(upload_id=upload.id, part_ids=parts)
    assert "expired" in _error(early.value)["message"]

    # Every worker runs this pass in its reaper, the session's worker every few seconds, so it may
    # have expired the upload before this call did: either way one pass did it, once.
    expired = expire_uploads()
    assert fresh.id not in expired
    if upload.id not in expired:
        parts_dir = _parts_dir(services_env, team_id, upload.id)
        wait_until(lambda: _status(upload.id) == "expired" and not parts_dir.exists(), timeout=30,
                   message="the worker's reaper to expire it and delete its parts")
    assert upload.id not in expire_uploads()  # once
    assert not _parts_dir(services_env, team_id, upload.id).exists()
    assert _parts_dir(services_env, team_id, fresh.id).is_dir()
    with session_scope() as session:
        assert session.get(Upload, upload.id).status == "expired"
        assert session.scalar(select(func.count()).select_from(UploadPart)
                              .where(UploadPart.upload_id == upload.id)) == 0
    with pytest.raises(openai.ConflictError):
        client.uploads.cancel(upload.id)

    # A clock an hour on expires the other one too.
    assert fresh.id in expire_uploads(now=utcnow() + dt.timedelta(hours=1, seconds=1))
    assert not _parts_dir(services_env, team_id, fresh.id).exists()


def test_content_that_fails_validation_answers_its_line_numbers_and_makes_no_file(oai):
    client, team_id, _ = oai
    content = CHAT[:200].rsplit(b"\n", 1)[0] + b"\n" + b'{"messages": broken}\n' + CHAT
    upload = _new(client, content)
    parts = _send(client, upload.id, content, 64)  # the bad line spans parts
    with pytest.raises(openai.BadRequestError) as invalid:
        client.uploads.complete(upload_id=upload.id, part_ids=parts)
    error = _error(invalid.value)
    bad_line = content[:content.index(b"broken")].count(b"\n") + 1
    assert error["param"] == "file" and error["code"] == "invalid_file" and f"line {bad_line}" in error["message"]
    assert error["errors"][0]["line"] == bad_line
    assert _team_files(team_id) == 0


def test_create_refuses_what_files_refuse_and_bad_sizes_or_types(oai):
    client, _, _ = oai
    for overrides, param in (({"purpose": "assistants"}, "purpose"), ({"bytes": 0}, "bytes"),
                             ({"bytes": 9 * 1024**3}, "bytes"), ({"mime_type": "image/png"}, "mime_type"),
                             ({"filename": ""}, "filename")):
        with pytest.raises(openai.BadRequestError) as refused:
            _new(client, CHAT, **overrides)
        assert _error(refused.value)["param"] == param, (overrides, refused.value.body)
    with pytest.raises(openai.BadRequestError) as unknown:
        _new(client, CHAT, extra_body={"colour": "blue"})
    assert _error(unknown.value)["param"] == "colour"
    with pytest.raises(openai.BadRequestError) as expiry:
        _new(client, CHAT, expires_after={"anchor": "created_at", "seconds": 60})
    assert _error(expiry.value)["param"] == "expires_after.seconds"
    assert _new(client, CHAT, mime_type="text/jsonl; charset=utf-8").status == "pending"


def test_an_upload_is_invisible_to_another_team(oai, make_team, server, services_env):
    client, team_id, _ = oai
    upload = _new(client, CHAT)
    part = client.uploads.parts.create(upload_id=upload.id, data=CHAT)
    _, other_key = make_team()
    other = openai.OpenAI(base_url=f"{server}/v1", api_key=other_key, max_retries=0)
    try:
        for call in (lambda: other.uploads.parts.create(upload_id=upload.id, data=CHAT),
                     lambda: other.uploads.complete(upload_id=upload.id, part_ids=[part.id]),
                     lambda: other.uploads.cancel(upload.id)):
            with pytest.raises(openai.NotFoundError) as missing:
                call()
            assert _error(missing.value)["code"] == "upload_not_found"
        # Another team's own upload cannot take this team's part either.
        theirs = other.uploads.create(bytes=len(CHAT), filename="x.jsonl", mime_type="application/jsonl",
                                      purpose="fine-tune")
        with pytest.raises(openai.BadRequestError):
            other.uploads.complete(upload_id=theirs.id, part_ids=[part.id])
    finally:
        other.close()
    assert client.uploads.complete(upload_id=upload.id, part_ids=[part.id]).status == "completed"


def test_a_part_over_the_part_limit_answers_413_and_keeps_nothing(services_env, make_team, tmp_path):
    team_id, key = make_team()
    proc, base = start_api({**services_env, "TUNEFORGE_UPLOADS__PART_MAX_BYTES": "1000"}, tmp_path / "api.log")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    try:
        upload = _new(client, CHAT)
        with pytest.raises(openai.APIStatusError) as big:
            client.uploads.parts.create(upload_id=upload.id, data=CHAT[:1001])
        assert big.value.status_code == 413 and _error(big.value)["code"] == "part_too_large"
        assert not _parts_dir(services_env, team_id, upload.id).exists()
        assert client.uploads.parts.create(upload_id=upload.id, data=CHAT[:1000]).upload_id == upload.id
    finally:
        client.close()
        _stop(proc)


def test_a_200_mb_upload_keeps_the_api_process_memory_flat(services_env, make_team, tmp_path):
    """Peak RSS (VmHWM) of the API process grows by far less than the upload while ~200 MB go through
    parts, completion, validation and download."""
    part_size = 50 * 1024 * 1024
    line = json.dumps({"messages": [{"role": "user", "content": "q" * 400},
                                    {"role": "assistant", "content": "a" * 400}]}).encode() + b"\n"
    path = tmp_path / "big.jsonl"
    with path.open("wb") as out:
        block = line * (1024 * 1024 // len(line) + 1)
        while out.tell() < 4 * part_size:
            out.write(block)
    size = path.stat().st_size
    _, key = make_team()
    proc, base = start_api(services_env, tmp_path / "api.log")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600)
    try:
        warm = client.uploads.upload_file_chunked(file=bytes(CHAT), filename="warm.jsonl", bytes=len(CHAT),
                                                  mime_type="application/jsonl", purpose="fine-tune", part_size=500)
        assert warm.status == "completed" and warm.file is not None
        client.files.content(warm.file.id).read()
        before = _peak_rss(proc.pid)
        done = client.uploads.upload_file_chunked(file=path, mime_type="application/jsonl", purpose="fine-tune",
                                                  part_size=part_size)
        assert done.status == "completed" and done.file is not None and done.file.bytes == size > TEST_UPLOAD_LIMIT
        digest = hashlib.sha256()
        with httpx.stream("GET", f"{base}/v1/files/{done.file.id}/content",
                          headers={"Authorization": f"Bearer {key}"}, timeout=600) as r:
            for chunk in r.iter_bytes():
                digest.update(chunk)
        assert digest.hexdigest() == done.file.sha256
        grown = _peak_rss(proc.pid) - before
        assert grown < 64 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB upload"
    finally:
        client.close()
        _stop(proc)


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_expires_after_reaches_the_file_and_an_idempotency_key_returns_the_same_upload(oai):
    client, _, _ = oai
    headers = {"Idempotency-Key": "upload-once"}
    upload = _new(client, CHAT, expires_after={"anchor": "created_at", "seconds": 7200}, extra_headers=headers)
    assert _new(client, CHAT, extra_headers=headers).id == upload.id
    part = client.uploads.parts.create(upload_id=upload.id, data=CHAT)
    done = client.uploads.complete(upload_id=upload.id, part_ids=[part.id])
    assert done.file is not None and done.file.expires_at == done.file.created_at + 7200


def test_uploads_work_on_the_embedded_default(services_env, tmp_path, tiny_model, make_team):
    from worker.reaper import expire_uploads

    with embedded_instance(tmp_path, tiny_model) as env, private_api(services_env, **env) as base:
        _, key = make_team()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        try:
            done = client.uploads.upload_file_chunked(file=bytes(CHAT), filename="chat.jsonl", bytes=len(CHAT),
                                                      mime_type="application/jsonl", purpose="fine-tune",
                                                      part_size=700)
            assert done.status == "completed" and done.file is not None
            assert client.files.content(done.file.id).content == CHAT
            left = _new(client, CHAT)
            client.uploads.parts.create(upload_id=left.id, data=CHAT)
            assert left.id in expire_uploads(now=utcnow() + dt.timedelta(hours=2))
            with pytest.raises(openai.ConflictError):
                client.uploads.cancel(left.id)
        finally:
            client.close()
