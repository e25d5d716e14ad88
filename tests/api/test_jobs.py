"""Job creation: the paper's recipe as defaults, every override validated with the field named."""

from __future__ import annotations

import pytest

from tests.factories import create_job, jsonl, post_job, uploaded_file_id

QUICK = {"training": {"max_steps": 1, "gradient_accumulation_steps": 1}}


def test_job_defaults_are_the_papers_recipe(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), suffix="recipe")
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] in ("queued", "running", "succeeded")
    spec = job["spec"]
    assert spec["lora"] == {"r": 8, "alpha": 32, "dropout": 0.05,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none"}
    assert spec["quantization"] == {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
    t = spec["training"]
    assert (t["batch_size"], t["gradient_accumulation_steps"], t["epochs"], t["learning_rate"]) == (1, 8, 4, 2e-4)
    assert (t["lr_scheduler"], t["warmup_ratio"], t["optimizer"], t["save_total_limit"], t["logging_steps"]) == (
        "cosine", 0.05, "paged_adamw_8bit", 3, 1)
    assert job["hyperparameters"] == {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 1.0}
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")


def test_openai_hyperparameters_map_onto_the_recipe(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client),
                     hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5})
    t = job["spec"]["training"]
    assert (t["epochs"], t["gradient_accumulation_steps"], t["learning_rate"]) == (2, 4, 1e-4)
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"target_modules": ["q_proj", "../x"]}}, "lora.target_modules"),
        ({"lora": {"target_modules": ["all-linear", "q_proj"]}}, "lora.target_modules"),
        ({"lora": {"target_modules": ["all-linears"]}}, "lora.target_modules"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"quantization": {"bits": 3}}, "quantization.bits"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"training": {"optimizer": "sgd-magic"}}, "training.optimizer"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"suffix": "has spaces!"}, "suffix"),
        ({"metadata": {"k": "v" * 600}}, "metadata"),
        ({"seed": -5}, "seed"),
    ],
)
def test_invalid_spec_is_refused_naming_the_field(api, make_team, tiny_model, body, param):
    _, key = make_team()
    client = api(key)
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": uploaded_file_id(client),
                                                **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert client.get("/fine_tuning/jobs").json()["data"] == []


def test_unknown_model_and_missing_files_answer_400(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    fid = uploaded_file_id(client)
    r = client.post("/fine_tuning/jobs", json={"model": "no-such-model", "training_file": fid})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "file-nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": fid,
                                                "validation_file": "file-nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": fid,
                                                "hyperparameters": {"batch_size": 3}, "training": {"batch_size": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.batch_size"
    assert client.get("/fine_tuning/jobs").json()["data"] == []


def test_malformed_json_body_answers_400_in_the_error_shape(api, make_team):
    _, key = make_team()
    r = api(key).post("/fine_tuning/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] is None and "JSON" in err["message"]


def test_list_filters_by_metadata_and_paginates(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    fid = uploaded_file_id(client, jsonl([{"text": "def f():\n    return 1"}] * 4))
    ids = [create_job(client, fid, metadata={"exp": "a" if i % 2 else "b"}, **QUICK)["id"] for i in range(4)]
    for job_id in ids:
        client.post(f"/fine_tuning/jobs/{job_id}/cancel")
    only_a = client.get("/fine_tuning/jobs", params={"metadata[exp]": "a"}).json()["data"]
    assert [j["id"] for j in only_a] == [ids[3], ids[1]]
    page = client.get("/fine_tuning/jobs", params={"limit": 3}).json()
    rest = client.get("/fine_tuning/jobs", params={"limit": 3, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in page["data"] + rest["data"]] == list(reversed(ids))
    assert page["has_more"] and not rest["has_more"]


def test_idempotency_key_creates_one_job(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    fid = uploaded_file_id(client)
    body = {"model": "tiny-llama", "training_file": fid, **QUICK}
    a = client.post("/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "job-1"}).json()
    b = client.post("/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "job-1"}).json()
    assert a["id"] == b["id"]
    assert len(client.get("/fine_tuning/jobs").json()["data"]) == 1
    client.post(f"/fine_tuning/jobs/{a['id']}/cancel")


def test_cancel_twice_is_idempotent_and_file_in_use_is_protected(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    fid = uploaded_file_id(client)
    job = create_job(client, fid, **QUICK)
    if job["status"] == "queued":
        r = client.delete(f"/files/{fid}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use"
    first = client.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    if first.status_code == 200:
        assert first.json()["status"] == "cancelled"
        assert client.post(f"/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    else:  # it already finished: cancelling an ended job is a conflict
        assert first.status_code == 409


@pytest.mark.parametrize(
    ("with_validation_file", "training", "param"),
    [
        (True, {"validation_split": 0.1}, "training.validation_split"),
        (False, {"eval_every_steps": 10}, "training.eval_every_steps"),
        (False, {"early_stopping_patience": 2}, "training.early_stopping_patience"),
        (False, {"select_best": "valid_loss"}, "training.select_best"),
    ],
)
def test_validation_settings_that_contradict_the_validation_set_answer_400(api, make_team, tiny_model,
                                                                          with_validation_file, training, param):
    _, key = make_team()
    client = api(key)
    fid = uploaded_file_id(client)
    body = {"model": "tiny-llama", "training_file": fid, "training": training,
            **({"validation_file": uploaded_file_id(client)} if with_validation_file else {})}
    r = client.post("/fine_tuning/jobs", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "validation" in err["message"]
    assert client.get("/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize(
    ("training", "param"),
    [
        ({"validation_split": 0.6}, "training.validation_split"),
        ({"validation_split": 0}, "training.validation_split"),
        ({"eval_every_steps": 0}, "training.eval_every_steps"),
        ({"early_stopping_patience": 0}, "training.early_stopping_patience"),
        ({"early_stopping_min_delta": -0.1}, "training.early_stopping_min_delta"),
        ({"select_best": "pass_at_k"}, "training.select_best"),
    ],
)
def test_out_of_range_validation_settings_are_refused_naming_the_field(api, make_team, tiny_model, training, param):
    _, key = make_team()
    client = api(key)
    r = post_job(client, uploaded_file_id(client), training=training)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_split_with_early_stopping_is_accepted_and_best_selection_defaults_to_auto(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client),
                     training={"validation_split": 0.2, "eval_every_steps": 5, "early_stopping_patience": 3})
    client.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    t = job["spec"]["training"]
    assert (t["validation_split"], t["eval_every_steps"], t["early_stopping_patience"]) == (0.2, 5, 3)
    assert (t["early_stopping_min_delta"], t["select_best"]) == (0.0, "auto")
