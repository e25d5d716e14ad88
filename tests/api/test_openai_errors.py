"""OpenAI's error semantics on every /v1 route: a body that parses but breaks a rule, a body that is
not JSON, and a bad query parameter all answer 400 invalid_request_error with `param` in OpenAI's
dotted style, so the official client raises BadRequestError; 422 is never used.

Request validation happens in the API before any inference process is asked, so the serving routes
need no inference process here; tiny-llama is the registered base model the requests name."""

from __future__ import annotations

import httpx
import openai
import pytest

from app.main import create_app
from tests.routes import v1_routes

_MESSAGES = [{"role": "user", "content": "Say hi."}]

# (arguments beyond the model, the param OpenAI's answer names)
_SAMPLING = [
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 200}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
]


@pytest.fixture
def oai(server, make_team, tiny_model):
    _, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client
    client.close()


def _refused(call) -> dict:
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    assert exc.value.status_code == 400
    body = exc.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["message"], body
    return body


@pytest.mark.parametrize(("extra", "param"), [
    *_SAMPLING,
    ({"messages": []}, "messages"),
    ({"messages": [*_MESSAGES, {"role": "user", "content": 5}]}, "messages.1.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": 123}, "model"),
])
def test_chat_completion_with_an_invalid_value_is_a_bad_request_naming_it(oai, extra, param):
    args = {"model": "tiny-llama", "messages": _MESSAGES, **extra}
    err = _refused(lambda: oai.chat.completions.create(**args))
    assert err["param"] == param, err
    assert param in err["message"]


def test_a_content_part_of_an_unknown_type_is_named_by_its_index(oai):
    messages = [{"role": "user", "content": [{"type": "hologram", "text": "hi"}]}]
    err = _refused(lambda: oai.chat.completions.create(model="tiny-llama", messages=messages))
    # The part, not the "content is not a string" of the union's other member.
    assert err["param"].startswith("messages.0.content.0"), err


@pytest.mark.parametrize(("extra", "param"), [
    *_SAMPLING,
    ({"prompt": {"text": "Hello"}}, "prompt"),
    ({"model": 123}, "model"),
])
def test_completion_with_an_invalid_value_is_a_bad_request_naming_it(oai, extra, param):
    args = {"model": "tiny-llama", "prompt": "def add(a, b):", **extra}
    err = _refused(lambda: oai.completions.create(**args))
    assert err["param"] == param, err


@pytest.mark.parametrize(("extra", "param"), [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"method": {"type": "reinforcement-by-vibes"}}, "method.type"),
    ({"seed": -5}, "seed"),
    ({"model": 123}, "model"),
    ({"training_file": None}, "training_file"),
    ({"extra_body": {"lora": {"r": -1}}}, "lora.r"),
    ({"extra_body": {"no_such_setting": 1}}, "no_such_setting"),
])
def test_fine_tuning_job_with_an_invalid_value_is_a_bad_request_naming_it(oai, extra, param):
    args = {"model": "tiny-llama", "training_file": "file-unchecked", **extra}
    err = _refused(lambda: oai.fine_tuning.jobs.create(**args))
    assert err["param"] == param, err
    assert list(oai.fine_tuning.jobs.list()) == []  # nothing half-written


def test_a_missing_required_field_is_named(api, make_team, tiny_model):
    _, key = make_team()
    r = api(key).post("/fine_tuning/jobs", json={"model": "tiny-llama"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "training_file" and r.json()["error"]["code"] == "invalid_value"


def test_an_invalid_query_parameter_is_a_bad_request_naming_it(oai):
    err = _refused(lambda: oai.fine_tuning.jobs.list(limit=0))
    assert err["param"] == "limit", err


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/fine_tuning/jobs"])
def test_malformed_json_is_a_bad_request_that_says_so(api, make_team, tiny_model, path):
    _, key = make_team()
    r = api(key).post(path, content=b'{"model": "tiny-llama", ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json" and err["param"] is None
    assert "could not be parsed as JSON" in err["message"] and "character 24" in err["message"], err


def test_every_v1_route_with_a_json_body_answers_malformed_json_with_400(server, make_team):
    paths = create_app().openapi()["paths"]
    _, key = make_team()
    routes = [(m, p) for m, p in v1_routes()
              if "application/json" in paths[p][m.lower()].get("requestBody", {}).get("content", {})]
    assert len(routes) >= 5, routes
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for method, path in routes:
            url = path.replace("{", "").replace("}", "").replace(":path", "")  # a parameter's name as its value
            r = client.request(method, url, content=b"{oops", headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (method, path, r.text)


def test_the_docs_promise_400_and_never_422():
    for path, ops in create_app().openapi()["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            assert "400" in op["responses"], (method, path)
