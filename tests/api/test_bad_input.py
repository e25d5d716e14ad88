"""Bad input is refused at the door: 400 in OpenAI's error shape, naming the offending parameter or
line, with nothing stored (no file row or blob, no job row)."""

from __future__ import annotations

import json

import httpx
import pytest

from app.api.v1.inference import _team_view
from tests.api.servers import private_api
from tests.api.test_files import _storage_files
from tests.conftest import free_port
from tests.factories import create_job, post_job, upload, uploaded_file_id


def _refused(r: httpx.Response, param: str | None, code: str = "invalid_value") -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code, err
    return err


def _no_jobs(client: httpx.Client) -> None:
    r = client.get("/fine_tuning/jobs")
    assert r.status_code == 200 and r.json()["data"] == [], r.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"metadata": {"team": "a\u0000b"}}, "metadata.team"),
        ({"metadata": {"k\u0000": "v"}}, "metadata.k\\u0000"),
        ({"suffix": "x\u0000"}, "suffix"),
        ({"eval": {"tasks": "file-\u0000"}}, "eval.tasks"),
    ],
    ids=["metadata-value", "metadata-key", "suffix", "eval-field"],
)
def test_nul_in_a_job_body_is_refused_and_no_job_is_stored(api, make_team, tiny_model, body, param):
    _, key = make_team()
    client = api(key)
    err = _refused(post_job(client, uploaded_file_id(client), **body), param)
    assert "NUL" in err["message"]
    _no_jobs(client)


def test_nul_in_a_key_name_is_refused(api, make_team):
    _, key = make_team()
    client = api(key)
    before = client.get("/keys").json()["data"]
    _refused(client.post("/keys", json={"name": "ci\u0000"}), "name")
    assert client.get("/keys").json()["data"] == before


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('"training": {"max_grad_norm": Infinity}', "training.max_grad_norm"),
        ('"training": {"max_grad_norm": 1e999}', "training.max_grad_norm"),
        ('"training": {"warmup_ratio": -Infinity}', "training.warmup_ratio"),
        ('"hyperparameters": {"learning_rate_multiplier": NaN}', "hyperparameters.learning_rate_multiplier"),
        ('"seed": 1, "seed": 2', "seed"),
    ],
    ids=["infinity", "overflow", "minus-infinity", "nan", "duplicate-key"],
)
def test_non_finite_numbers_and_duplicate_keys_in_json_are_refused(api, make_team, tiny_model, raw, param):
    _, key = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    content = f'{{"model": "tiny-llama", "training_file": "{file_id}", {raw}}}'
    r = client.post("/fine_tuning/jobs", content=content, headers={"Content-Type": "application/json"})
    _refused(r, param)
    _no_jobs(client)


def test_finite_numbers_are_still_accepted_and_echoed(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), training={"max_grad_norm": 1e300})
    assert job["spec"]["training"]["max_grad_norm"] == 1e300
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")


def _multipart(content: bytes, *, closed: bool = True, filename: str = "d.jsonl",
               purpose: str = "fine-tune") -> tuple[bytes, str]:
    """A multipart body written byte by byte (httpx would percent-encode a NUL in a file name)."""
    boundary = "tuneforgeboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + content
    if closed:
        body += f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_multipart_without_its_closing_boundary_is_refused_and_nothing_stored(api, make_team, services_env):
    _, key = make_team()
    client = api(key)
    before = _storage_files(services_env)
    lines = b'{"text": "one"}\n{"text": "two"}\n'
    body, content_type = _multipart(lines, closed=False)
    r = client.post("/files", content=body, headers={"Content-Type": content_type})
    _refused(r, "file", code="upload_incomplete")
    assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env) == before
    # The same body, closed, is a good upload: the refusal was for the truncation alone.
    body, content_type = _multipart(lines)
    r = client.post("/files", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == len(lines)


@pytest.mark.parametrize(("filename", "purpose", "param", "code"), [
    ("d\u0000.jsonl", "fine-tune", "file", "invalid_filename"),
    ("d.jsonl", "fine-tune\u0000", "purpose", "invalid_value"),
], ids=["filename", "purpose"])
def test_nul_in_an_upload_is_refused_and_nothing_stored(api, make_team, services_env, filename, purpose, param,
                                                        code):
    _, key = make_team()
    client = api(key)
    before = _storage_files(services_env)
    body, content_type = _multipart(b'{"text": "one"}\n', filename=filename, purpose=purpose)
    _refused(client.post("/files", content=body, headers={"Content-Type": content_type}), param, code=code)
    assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env) == before


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        (b'{"text": "ok"}\n{"prompt": "p", "completion": NaN}\n', 2, "NaN"),
        (b'{"text": "ok"}\n{"text": "a", "n": Infinity}\n', 2, "Infinity"),
        (b'{"text": "a", "text": "b"}\n', 1, 'the key "text" appears more than once'),
        (b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n', 1, "messages.0.content"),
    ],
    ids=["nan", "infinity", "duplicate-key", "nested-duplicate-key"],
)
def test_jsonl_with_non_finite_numbers_or_duplicate_keys_is_refused_by_line(api, make_team, services_env,
                                                                            content, line, needle):
    _, key = make_team()
    client = api(key)
    before = _storage_files(services_env)
    err = _refused(upload(client, content), "file", code="invalid_file")
    assert f"line {line}" in err["message"] and needle in err["message"], err["message"]
    assert err["errors"][0]["line"] == line
    assert client.get("/files").json()["data"] == []
    assert _storage_files(services_env) == before


@pytest.mark.parametrize(
    ("query", "param", "code"),
    [
        ('metadata[a"b]=x', 'metadata[a"b]', "invalid_filter"),
        ("metadata[%00]=x", "metadata[\\u0000]", "invalid_value"),
        ("metadata[]=x", "metadata[]", "invalid_filter"),
        ("metadata[a]b=x", "metadata[a]b", "invalid_filter"),
        ("metadata[k]=1&metadata[k]=2", "metadata[k]", "invalid_filter"),
        ("metadata=x", "metadata", "invalid_filter"),
        ("metadata=null&metadata[k]=v", "metadata", "invalid_filter"),
        ("status=queued", "status", "unknown_parameter"),
        ("metadata[k]=%00", "metadata[k]", "invalid_value"),
    ],
    ids=["quote", "nul-key", "empty-key", "trailing", "twice", "bare", "null-and-pairs", "unknown", "nul-value"],
)
def test_malformed_or_unknown_job_filters_are_refused_naming_the_parameter(api, make_team, query, param, code):
    _, key = make_team()
    r = api(key).get(f"/fine_tuning/jobs?{query}")
    _refused(r, param, code=code)


@pytest.mark.parametrize(("path", "param"), [
    ("/files?purpose=fine-tune&status=processed", "status"),
    ("/files?metadata[k]=v", "metadata[k]"),
    ("/models?limit=5", "limit"),
    ("/evaluations?status=running", "status"),
    ("/quotas?team=other", "team"),
])
def test_unknown_query_parameters_are_refused_on_every_route(api, make_team, path, param):
    _, key = make_team()
    _refused(api(key).get(path), param, code="unknown_parameter")


def test_nul_in_query_and_path_parameters_is_refused(api, make_team):
    _, key = make_team()
    client = api(key)
    _refused(client.get("/files?purpose=fine%00tune"), "purpose")
    _refused(client.get("/files/file-%00"), "file_id")


def test_metadata_filters_still_find_their_jobs(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    file_id = uploaded_file_id(client)
    job = create_job(client, file_id, metadata={"team": "search", "a.b c'd": "v"})
    other = create_job(client, file_id, metadata={"team": "other"})
    try:
        for query in ("metadata[team]=search", "metadata[a.b c'd]=v", "metadata[team]=search&limit=5"):
            r = client.get(f"/fine_tuning/jobs?{query}")
            assert r.status_code == 200, r.text
            assert [j["id"] for j in r.json()["data"]] == [job["id"]], query
    finally:
        for j in (job, other):
            client.post(f"/fine_tuning/jobs/{j['id']}/cancel")


def test_a_metadata_key_no_filter_could_find_is_refused_at_create(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    r = post_job(client, uploaded_file_id(client), metadata={'a"b': "x"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata"
    _no_jobs(client)


def test_readyz_names_no_host_or_port_of_a_dependency_that_is_down(services_env):
    port = free_port()
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{port}/tuneforge"
    with private_api(services_env, TUNEFORGE_DATABASE_URL=dead) as base:
        ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unavailable" and body["database"].startswith("unavailable")
    assert str(port) not in ready.text and "127.0.0.1" not in ready.text and "postgres" not in ready.text


def test_inference_stats_show_no_filesystem_paths():
    # The engine's counters as an inference process answers them (worker/inference/engine.py stats()).
    stats = {"base": {"name": "tiny-llama", "path": "/srv/tuneforge/models/tiny-llama", "device": "cpu"},
             "adapters_loaded": [{"id": "ftadapter-1", "path": "/srv/cache/ftadapter-1", "bytes": 10},
                                 {"id": "ftadapter-2", "path": "/srv/cache/ftadapter-2", "bytes": 10}],
             "per_adapter_requests": {"ftadapter-1": 3, "ftadapter-2": 4}}
    view = _team_view(stats, {"ftadapter-1"})
    assert "/srv" not in json.dumps(view)
    assert view["base"] == {"name": "tiny-llama", "device": "cpu"}
    assert view["adapters_loaded"] == [{"id": "ftadapter-1", "bytes": 10}]
