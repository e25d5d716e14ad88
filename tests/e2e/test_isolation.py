"""Two teams: another team's id answers 404 exactly like a missing one, on every route."""

from __future__ import annotations

import re

from tests.routes import v1_routes

# Route parameter -> (key in the `trained` fixture's objects, prefix of a missing id of that kind)
PARAMS = {"file_id": ("file_id", "file-"), "job_id": ("job_id", "ftjob-"), "adapter_id": ("adapter_id", "ftadapter-"),
          "model_id": ("model_id", "ft:tiny-llama:nobody::ftjob-"), "evaluation_id": ("evaluation_id", "eval-"),
          "key_id": ("key_id", "key-")}
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
    evaluation = trained["client"].post("/evaluations", json={"model": job["fine_tuned_model"], "tasks": "humaneval",
                                                             "limit": 1, "max_tokens": 8}).json()
    owned = {"file_id": trained["file_id"], "job_id": job["id"], "adapter_id": job["adapter_id"],
             "model_id": job["fine_tuned_model"], "evaluation_id": evaluation["id"],
             "key_id": trained["client"].get("/keys").json()["data"][0]["id"]}
    missing = {name: prefix + MISSING_SUFFIX for name, (_, prefix) in PARAMS.items()}
    _, other_key = make_team()
    other = api(other_key)
    checked = 0
    for method, path in v1_routes():
        params = re.findall(r"\{(\w+)", path)
        if not params:
            continue
        theirs = other.request(method, _fill(path, owned))
        absent = other.request(method, _fill(path, missing))
        assert theirs.status_code == 404, (method, path, theirs.text)
        assert absent.status_code == 404, (method, path, absent.text)
        assert _normalise(theirs.json(), *owned.values()) == _normalise(absent.json(), *missing.values())
        checked += 1
    assert checked >= 10
    # The owner still sees everything, untouched by the other team's attempts (deletes included).
    owner = trained["client"]
    assert owner.get(f"/files/{owned['file_id']}").status_code == 200
    assert owner.get(f"/fine_tuning/jobs/{owned['job_id']}").json()["status"] == "succeeded"
    assert owner.get(f"/adapters/{owned['adapter_id']}").status_code == 200
    assert owner.get(f"/models/{owned['model_id']}").status_code == 200
    assert owner.get(f"/evaluations/{owned['evaluation_id']}").status_code == 200


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
