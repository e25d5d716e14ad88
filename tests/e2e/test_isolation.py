"""Two teams: another team's id answers 404 exactly like a missing one, on every route."""

from __future__ import annotations

import re

from tests.routes import v1_routes

# Route parameter -> (key in the `trained` fixture's objects, prefix of a missing id of that kind)
PARAMS = {"file_id": ("file_id", "file-"), "job_id": ("job_id", "ftjob-"), "adapter_id": ("adapter_id", "ftadapter-"),
          "model_id": ("model_id", "ft:tiny-llama:nobody::ftjob-"), "evaluation_id": ("evaluation_id", "eval-"),
          "key_id": ("key_id", "key-"), "upload_id": ("upload_id", "upload-"),
          "webhook_id": ("webhook_id", "webhook-"), "export_id": ("export_id", "ftexport-")}
# Routes that read a body: a valid one, so the answer is decided by whose object it is, not by the body.
BODIES = {("POST", "/v1/uploads/{upload_id}/parts"): {"files": {"data": ("part", b"{}\n")}},
          ("POST", "/v1/uploads/{upload_id}/complete"): {"json": {"part_ids": []}},
          ("POST", "/v1/adapters/{adapter_id}/exports"): {"json": {"format": "merged"}}}
MISSING_SUFFIX = "0000000000000000deadbeef"


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::path)?\}", lambda m: values[m.group(1)], path)


def _normalise(body: dict, *ids: str) -> dict:
    text = repr(body)
    for value in ids:
        text = text.replace(value, "<id>")
    return text


def test_every_route_hides_another_teams_objects(trained, api, make_team):
    job = trained["job"]
    owner = trained["client"]
    evaluation = owner.post("/evaluations", json={"model": job["fine_tuned_model"], "tasks": "humaneval",
                                                  "limit": 1, "max_tokens": 8}).json()
    upload = owner.post("/uploads", json={"filename": "x.jsonl", "purpose": "fine-tune", "bytes": 3,
                                          "mime_type": "application/jsonl"}).json()
    # An address literal: the endpoint check needs no DNS, and nothing the team does later is delivered
    # (the webhook is deleted before this test ends).
    webhook = owner.post("/webhooks", json={"url": "https://192.0.32.10/hook"}).json()
    export = owner.post(f"/adapters/{job['adapter_id']}/exports", json={"format": "merged"}).json()
    owned = {"file_id": trained["file_id"], "job_id": job["id"], "adapter_id": job["adapter_id"],
             "model_id": job["fine_tuned_model"], "evaluation_id": evaluation["id"],
             "key_id": owner.get("/keys").json()["data"][0]["id"], "upload_id": upload["id"],
             "webhook_id": webhook["id"], "export_id": export["id"]}
    missing = {name: prefix + MISSING_SUFFIX for name, (_, prefix) in PARAMS.items()}
    _, other_key = make_team()
    other = api(other_key)
    checked = 0
    for method, path in v1_routes():
        params = re.findall(r"\{(\w+)", path)
        if not params:
            continue
        body = BODIES.get((method, path), {})
        theirs = other.request(method, _fill(path, owned), **body)
        absent = other.request(method, _fill(path, missing), **body)
        assert theirs.status_code == 404, (method, path, theirs.text)
        assert absent.status_code == 404, (method, path, absent.text)
        assert _normalise(theirs.json(), *owned.values()) == _normalise(absent.json(), *missing.values())
        checked += 1
    assert checked >= 30  # every route with an id, the newer ones (uploads, webhooks, exports) included
    # The owner still sees everything, untouched by the other team's attempts (deletes included).
    assert owner.get(f"/files/{owned['file_id']}").status_code == 200
    assert owner.get(f"/fine_tuning/jobs/{owned['job_id']}").json()["status"] == "succeeded"
    assert owner.get(f"/adapters/{owned['adapter_id']}").status_code == 200
    assert owner.get(f"/models/{owned['model_id']}").status_code == 200
    assert owner.get(f"/evaluations/{owned['evaluation_id']}").status_code == 200
    assert owner.get(f"/exports/{owned['export_id']}").status_code == 200
    assert owner.post(f"/uploads/{owned['upload_id']}/cancel").json()["status"] == "cancelled"
    assert owner.delete(f"/webhooks/{owned['webhook_id']}").status_code == 200


def test_lists_show_only_the_teams_own_objects(trained, api, make_team):
    _, other_key = make_team()
    other = api(other_key)
    assert other.get("/files").json()["data"] == []
    assert other.get("/fine_tuning/jobs").json()["data"] == []
    assert other.get("/adapters").json()["data"] == []
    assert other.get("/evaluations").json()["data"] == []
    assert trained["job"]["fine_tuned_model"] not in [m["id"] for m in other.get("/models").json()["data"]]
    assert "tiny-llama" in [m["id"] for m in other.get("/models").json()["data"]]


def test_another_teams_file_cannot_be_trained_on(trained, api, make_team, tiny_model):
    _, other_key = make_team()
    other = api(other_key)
    theirs = other.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": trained["file_id"]})
    absent = other.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "file-" + MISSING_SUFFIX})
    assert theirs.status_code == absent.status_code == 400
    assert _normalise(theirs.json(), trained["file_id"]) == _normalise(absent.json(), "file-" + MISSING_SUFFIX)
