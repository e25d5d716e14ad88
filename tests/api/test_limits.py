"""Input limits: body caps on the raw stream (declared, chunked, or lying about its length), line
length caps, and hostile filenames that are stored only as metadata."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.api.limits import ENVELOPE_BYTES
from app.core.config import Settings
from tests.api.servers import private_api
from tests.conftest import TEST_UPLOAD_LIMIT
from tests.factories import demo_tasks, upload

JSON_LIMIT = Settings.model_fields["request_max_bytes"].default


def _read_all(sock: socket.socket) -> bytes:
    """Read until the server closes; a reset after its answer ends the read too."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _connect(base: str, timeout: float = 10) -> socket.socket:
    url = urlsplit(base)
    return socket.create_connection((url.hostname, url.port), timeout=timeout)


def _raw(base: str, data: bytes) -> bytes:
    """Send raw bytes on one connection and read until the server closes it."""
    with _connect(base) as sock:
        sock.sendall(data)
        return _read_all(sock)


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response's head and body (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def _head(method: str, path: str, key: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Authorization: Bearer {key}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _error(raw: bytes) -> tuple[int, dict, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"], head.decode().lower()


def _storage_files(services_env) -> set[Path]:
    root = Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage"
    return {p for p in root.rglob("*") if p.is_file()}


def test_a_json_body_declared_over_the_cap_is_refused_before_it_is_read(server, make_team):
    _, key = make_team()
    # Only the headers are sent: the 413 must come without waiting for the body.
    raw = _raw(server, _head("POST", "/v1/fine_tuning/jobs", key, {
        "Content-Type": "application/json", "Content-Length": str(JSON_LIMIT + 1)}))
    status, error, head = _error(raw)
    assert status == 413
    assert error["code"] == "request_too_large" and str(JSON_LIMIT) in error["message"]
    assert "connection: close" in head


def test_a_chunked_json_body_over_the_cap_answers_413(api, make_team):
    _, key = make_team()
    piece = b" " * 65536

    def body():  # a generator: sent chunked, with no Content-Length
        yield b'{"model": "tiny-llama", "suffix": "'
        for _ in range(JSON_LIMIT // len(piece) + 2):
            yield piece
        yield b'"}'

    r = api(key).post("/fine_tuning/jobs", content=body(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert api(key).get("/fine_tuning/jobs").json()["data"] == []


def test_a_body_longer_than_its_content_length_is_cut_at_the_declared_length(server, make_team):
    """uvicorn hands the app exactly the declared bytes, so the cap holds; the surplus is parsed as
    the next request on the connection, refused as malformed, and the connection closed (a client
    still sending may see that close as a reset)."""
    import httpx

    _, key = make_team()
    declared = b'{"model": "no-such-model", "training_file": "file-x"}'
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/v1/fine_tuning/jobs", key, {
            "Content-Type": "application/json", "Content-Length": str(len(declared))}) + declared + b"x" * 4096)
        head, body = _read_response(sock)
        assert head.startswith(b"HTTP/1.1 400")
        assert json.loads(body)["error"]["code"] == "model_not_found"  # from the declared bytes alone
        try:
            sock.sendall(b"x" * (JSON_LIMIT + 1))
        except (BrokenPipeError, ConnectionResetError):
            pass
        rest = _read_all(sock)
    assert rest in (b"", ) or (rest.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request received." in rest)
    assert b"model_not_found" not in rest  # the surplus never reached the app
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_an_upload_declared_over_the_cap_is_refused_before_it_is_read(server, make_team, services_env):
    _, key = make_team()
    before = _storage_files(services_env)
    raw = _raw(server, _head("POST", "/v1/files", key, {
        "Content-Type": "multipart/form-data; boundary=b",
        "Content-Length": str(TEST_UPLOAD_LIMIT + ENVELOPE_BYTES + 1)}))
    status, error, _ = _error(raw)
    assert status == 413 and error["param"] == "file" and error["code"] == "file_too_large"
    assert _storage_files(services_env) == before


def test_a_chunked_upload_padded_outside_its_file_part_is_cut_at_the_raw_cap(api, make_team, services_env):
    """The multipart parser skips bytes after the closing boundary; they count against the cap anyway,
    and the file part already received is discarded."""
    _, key = make_team()
    piece = b"p" * 65536

    def body():
        yield (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n"
               + demo_tasks() + b"\r\n--b--\r\n")
        for _ in range((TEST_UPLOAD_LIMIT + ENVELOPE_BYTES) // len(piece) + 2):
            yield piece

    before = _storage_files(services_env)
    r = api(key).post("/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert r.json()["error"] == {"message": f"The upload exceeds the limit of {TEST_UPLOAD_LIMIT} bytes.",
                                 "type": "invalid_request_error", "param": "file", "code": "file_too_large"}
    assert _storage_files(services_env) == before


def test_a_malformed_multipart_body_answers_400(api, make_team):
    _, key = make_team()
    r = api(key).post("/files", content=b"no boundary here\r\n--b--\r\n",
                      headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_multipart" and r.json()["error"]["param"] == "file"


def test_a_line_over_the_line_cap_is_refused_with_its_number(services_env, make_team):
    import httpx

    _, key = make_team()
    before = _storage_files(services_env)
    content = b'{"text": "short"}\n' + json.dumps({"text": "y" * 2000}).encode() + b"\n"
    with private_api(services_env, TUNEFORGE_UPLOAD_MAX_LINE_BYTES="1024") as base, \
            httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}) as client:
        r = upload(client, content)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "file" and error["errors"][0]["line"] == 2
        assert "longer than the limit of 1024 bytes" in error["message"]
        assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env) == before


@pytest.mark.parametrize("filename", [
    "../../etc/passwd", "/etc/passwd", "..", "..\\..\\windows\\system32\\config", "a\x00b.jsonl",
    "x" * 4000 + ".jsonl", "données-日本語-😀.jsonl", "teams/other-team/files/file-x.jsonl",
], ids=["traversal", "absolute", "dotdot", "backslashes", "nul", "very-long", "unicode", "other-teams-key"])
def test_a_hostile_filename_is_only_metadata(api, make_team, services_env, filename):
    team_id, key = make_team()
    client = api(key)
    before = _storage_files(services_env)
    r = upload(client, demo_tasks(), filename=filename)
    assert r.status_code == 200, r.text
    f = r.json()
    shown = f["filename"]
    assert shown and shown not in (".", "..") and len(shown) <= 255
    assert not {"/", "\\", "\x00"} & set(shown)
    root = Path(services_env["TUNEFORGE_DATA_DIR"]) / "storage"
    # The blob's key comes from the team and file ids alone.
    assert _storage_files(services_env) - before == {root / "teams" / team_id / "files" / f"{f['id']}.jsonl"}
    assert client.get(f"/files/{f['id']}/content").content == demo_tasks()


def test_text_with_nul_answers_400_not_a_server_error(api, make_team):
    """Postgres text cannot hold NUL: the database's refusal is the request's fault."""
    _, key = make_team()
    client = api(key)
    for r in (client.get("/files", params={"after": "file-\x00"}),
              client.post("/fine_tuning/jobs", json={"model": "tiny\x00llama", "training_file": "file-x"})):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_value" and "NUL" in r.json()["error"]["message"]
