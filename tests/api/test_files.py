"""Uploads: streamed, hashed, validated line by line; invalid or oversize files leave nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import TEST_UPLOAD_LIMIT
from tests.factories import demo_tasks, jsonl, upload


def _storage_files(services_env, team_id: str | None = None) -> list[Path]:
    """The blobs in storage, or a team's and the temporary ones (other tests' jobs, still running in
    the shared worker, write and delete theirs meanwhile)."""
    root = Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage"
    folders = [root] if team_id is None else [root / "teams" / team_id, root / ".tmp"]
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())


def test_upload_records_size_sha256_format_and_round_trips(api, make_team):
    _, key = make_team()
    client = api(key)
    content = demo_tasks()
    r = upload(client, content, filename="../../etc/passwd tasks.jsonl")
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["object"] == "file" and f["id"].startswith("file-")
    assert f["bytes"] == len(content)
    assert f["sha256"] == hashlib.sha256(content).hexdigest()
    assert f["format"] == "mbpp" and f["examples"] == content.count(b"\n")
    assert "/" not in f["filename"]  # never a path
    assert client.get(f"/files/{f['id']}/content").content == content
    assert client.get(f"/files/{f['id']}").json() == f
    assert [x["id"] for x in client.get("/files").json()["data"]] == [f["id"]]


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        (b'{"text": "ok"}\n{"text": broken}\n', 2, "JSON"),
        (b'{"text": "ok"}\n[1, 2]\n', 2, "object"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "UTF-8"),
        (jsonl([{"messages": [{"role": "bot", "content": "hi"}]}]), 1, "role"),
        (jsonl([{"prompt": "p", "completion": 3}]), 1, "completion"),
        (jsonl([{"text": "t", "code": "c", "test_list": "assert x"}]), 1, "test_list"),
        (jsonl([{"prompt": "def f():", "canonical_solution": "  pass", "test": "", "entry_point": "f"}]), 1, "test"),
        (jsonl([{"question": "no known shape"}]), 1, "shape"),
        (jsonl([{"text": "a"}, {"prompt": "p", "completion": "c"}]), 2, "format"),
    ],
    ids=["bad-json", "not-object", "not-utf8", "chat-role", "completion-type", "mbpp-tests", "humaneval-test",
         "unknown-shape", "mixed-formats"],
)
def test_invalid_upload_is_refused_with_line_numbers_and_nothing_stored(api, make_team, services_env, content,
                                                                        line, needle):
    team_id, key = make_team()
    client = api(key)
    before = _storage_files(services_env, team_id)
    r = upload(client, content)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "file" and err["code"] == "invalid_file"
    assert f"line {line}" in err["message"] and needle.lower() in err["message"].lower()
    assert err["errors"][0]["line"] == line
    assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env, team_id) == before


def test_empty_upload_is_refused(api, make_team):
    _, key = make_team()
    client = api(key)
    r = upload(client, b"")
    assert r.status_code == 400
    assert "empty" in r.json()["error"]["message"]
    assert client.get("/files").json()["data"] == []


def test_oversize_upload_answers_413_and_stores_nothing(api, make_team, services_env):
    team_id, key = make_team()
    client = api(key)
    line = json.dumps({"text": "x" * 1000}).encode() + b"\n"
    content = line * (TEST_UPLOAD_LIMIT // len(line) + 10)
    before = _storage_files(services_env, team_id)
    r = upload(client, content)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "file"
    assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env, team_id) == before


def test_chunked_oversize_upload_without_content_length_answers_413(api, make_team, services_env):
    team_id, key = make_team()
    client = api(key)
    boundary = "tfboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    line = json.dumps({"text": "y" * 1000}).encode() + b"\n"

    def body():  # a generator: httpx sends it chunked, with no Content-Length
        yield head
        for _ in range(TEST_UPLOAD_LIMIT // len(line) + 10):
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    before = _storage_files(services_env, team_id)
    r = client.post("/files", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env, team_id) == before


def test_wrong_purpose_is_refused(api, make_team):
    _, key = make_team()
    r = upload(api(key), demo_tasks(), purpose="vision")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"


def test_upload_without_file_part_is_refused(api, make_team):
    _, key = make_team()
    r = api(key).post("/files", data={"purpose": "fine-tune"}, files={"other": ("x", b"1")})
    assert r.status_code == 400


def test_same_idempotency_key_returns_the_same_file(api, make_team):
    _, key = make_team()
    client = api(key)
    first = upload(client, demo_tasks(), headers={"Idempotency-Key": "upload-1"}).json()
    again = upload(client, demo_tasks(), headers={"Idempotency-Key": "upload-1"}).json()
    other = upload(client, demo_tasks(), headers={"Idempotency-Key": "upload-2"}).json()
    assert first["id"] == again["id"] != other["id"]
    assert len(client.get("/files").json()["data"]) == 2


def test_delete_removes_row_and_blob(api, make_team, services_env):
    _, key = make_team()
    client = api(key)
    f = upload(client, demo_tasks()).json()
    blobs = [p for p in _storage_files(services_env) if f["id"] in p.name]
    assert len(blobs) == 1
    r = client.delete(f"/files/{f['id']}")
    assert r.json() == {"id": f["id"], "object": "file", "deleted": True}
    assert client.get(f"/files/{f['id']}").status_code == 404
    assert not blobs[0].exists()


def test_files_list_paginates_newest_first(api, make_team):
    _, key = make_team()
    client = api(key)
    ids = [upload(client, jsonl([{"text": f"t{i}"}])).json()["id"] for i in range(5)]
    page1 = client.get("/files", params={"limit": 2}).json()
    page2 = client.get("/files", params={"limit": 2, "after": page1["data"][-1]["id"]}).json()
    page3 = client.get("/files", params={"limit": 2, "after": page2["data"][-1]["id"]}).json()
    got = [f["id"] for p in (page1, page2, page3) for f in p["data"]]
    assert got == list(reversed(ids))
    assert page1["has_more"] and page2["has_more"] and not page3["has_more"]
