"""Evaluations through the API and the real worker: every number comes from executed programs."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import wait_until
from tests.factories import all_events, create_job, jsonl, upload, uploaded_file_id, wait_for_job

FINAL = ("succeeded", "failed")


def _wait_eval(client, evaluation_id: str, timeout: float = 300) -> dict:
    return wait_until(lambda: (e := client.get(f"/evaluations/{evaluation_id}").json())["status"] in FINAL and e,
                      timeout=timeout, interval=0.3, message=f"evaluation {evaluation_id}")


def _results(client, evaluation_id: str) -> list[dict]:
    r = client.get(f"/evaluations/{evaluation_id}/results")
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def test_job_with_eval_file_reports_base_and_tuned_from_real_executions(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    tasks = uploaded_file_id(client)  # the bundled MBPP-style tasks: train on them, evaluate on them
    job = create_job(client, tasks, hyperparameters={"n_epochs": 1},
                     eval={"tasks": tasks, "limit": 6, "max_tokens": 48, "timeout_seconds": 5})
    assert job["spec"]["evaluation"]["tasks"] == tasks
    done = wait_for_job(client, job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    messages = [e["message"] for e in all_events(client, job["id"])]
    assert any(m.startswith("Training done; evaluating") for m in messages)
    report = done["usage"]["evaluation"]
    for side in ("base", "tuned"):
        r = report[side]
        assert r["tasks"] == 6 and r["samples"] == 6 and sum(r["outcomes"].values()) == 6
        assert r["sandbox_mode"] in ("strong", "weak") and 0.0 <= r["pass_at_k"]["1"] <= 1.0
        assert r["passed"] == round(r["pass_at_k"]["1"] * 6)
        assert math.isfinite(r["heldout_loss"]) and r["generation_seconds"] > 0 and r["execution_seconds"] > 0
    assert report["pass_at_k_delta"]["1"] == pytest.approx(
        report["tuned"]["pass_at_k"]["1"] - report["base"]["pass_at_k"]["1"])
    assert report["forgetting"]["increase"] == pytest.approx(
        report["tuned"]["heldout_loss"] - report["base"]["heldout_loss"])
    # Evaluated on the tasks it trained on: the report and an event say so.
    assert report["overlap"]["contaminated"] is True and report["overlap"]["count"] == 6
    assert report["overlap"]["task_ids"] == [str(i) for i in range(1, 7)] and report["overlap"]["files"] == [tasks]
    warnings = [e for e in all_events(client, job["id"]) if e["level"] == "warn"]
    assert any("6 of the 6 evaluation tasks are in the job's training data" in e["message"] for e in warnings)
    assert "quantization" not in report
    evals = [e for e in client.get("/evaluations").json()["data"] if e["job_id"] == job["id"]]
    assert sorted(e["role"] for e in evals) == ["base", "tuned"]
    for e in evals:
        rows = _results(client, e["id"])
        assert len(rows) == 6 and {r["task_id"] for r in rows} == {str(i) for i in range(1, 7)}
        # Each row is an execution: an outcome, an exit code or a timeout, and the time it took.
        assert all(r["outcome"] in ("passed", "failed", "timeout") and r["wall_s"] > 0 for r in rows)
        assert sum(r["passed"] for r in rows) == e["result"]["passed"]


def test_a_job_compares_its_adapter_on_the_16bit_and_the_4bit_base(api, make_team, worker):
    from importlib import resources

    _, key = make_team()
    client = api(key)
    train = uploaded_file_id(client)  # the demo tasks
    heldout = uploaded_file_id(client, resources.files("tuneforge.data").joinpath("code_tasks_heldout.jsonl")
                               .read_bytes())
    job = create_job(client, train, hyperparameters={"n_epochs": 1},
                     eval={"tasks": heldout, "limit": 4, "max_tokens": 32, "timeout_seconds": 5,
                           "compare_quantization": True})
    assert job["spec"]["evaluation"]["compare_quantization"] is True
    done = wait_for_job(client, job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    report = done["usage"]["evaluation"]
    evals = {e["role"]: e for e in client.get("/evaluations").json()["data"] if e["job_id"] == job["id"]}
    assert sorted(evals) == ["base", "tuned", "tuned_4bit"] and all(e["status"] == "succeeded" for e in evals.values())
    assert evals["tuned_4bit"]["adapter_id"] == evals["tuned"]["adapter_id"] == done["adapter_id"] is not None
    # The 4-bit side really ran on a bitsandbytes 4-bit base; the others on the 16-bit one.
    assert report["tuned_4bit"]["base_weights"]["quantized"] is True
    assert report["tuned_4bit"]["base_weights"]["linear4bit_layers"] > 0
    assert not report["tuned"]["base_weights"]["quantized"] and not report["base"]["base_weights"]["quantized"]
    q = report["quantization"]
    assert q["tuned_16bit"] == report["tuned"]["pass_at_k"] and q["tuned_4bit"] == report["tuned_4bit"]["pass_at_k"]
    p16, p4 = q["tuned_16bit"]["1"], q["tuned_4bit"]["1"]
    assert report["tuned_4bit"]["samples"] == 4 and report["tuned_4bit"]["passed"] == round(p4 * 4)
    assert q["delta"]["1"] == pytest.approx(p4 - p16)
    assert q["relative_loss"]["1"] == (pytest.approx((p16 - p4) / p16) if p16 > 0 else None)
    assert q["within_paper_bound"] is (p16 == 0 or (p16 - p4) / p16 <= q["bound"] + 1e-12) and q["bound"] == 0.04
    assert q["heldout_loss_increase"] == pytest.approx(
        report["tuned_4bit"]["heldout_loss"] - report["tuned"]["heldout_loss"])
    # Held-out tasks: disjoint from the training file, and no warning.
    assert report["overlap"]["contaminated"] is False and report["overlap"]["count"] == 0
    assert report["overlap"]["tasks"] == 4 and report["overlap"]["files"] == [train]
    assert not any(e["level"] == "warn" for e in all_events(client, job["id"]))


def test_brought_completions_are_scored_on_humaneval(api, make_team, worker):
    from worker.evaluation.harness import load_humaneval

    _, key = make_team()
    client = api(key)
    problems = list(load_humaneval().values())[:6]
    rows = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems[:4]]
    rows += [{"task_id": p.task_id, "completion": "    return None\n"} for p in problems[4:]]
    r = upload(client, jsonl(rows), purpose="evals")
    assert r.status_code == 200 and r.json()["format"] == "completions", r.text
    ev = client.post("/evaluations", json={"completions_file": r.json()["id"], "tasks": "humaneval", "limit": 6})
    assert ev.status_code == 200, ev.text
    done = _wait_eval(client, ev.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["pass_at_k"]["1"] == pytest.approx(4 / 6) and done["result"]["passed"] == 4
    by_task = {row["task_id"]: row for row in _results(client, done["id"])}
    assert all(by_task[p.task_id]["passed"] for p in problems[:4])
    assert not any(by_task[p.task_id]["passed"] for p in problems[4:])


def test_a_model_is_evaluated_on_builtin_humaneval(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    ev = client.post("/evaluations", json={"model": "tiny-llama", "tasks": "humaneval", "limit": 3,
                                           "max_tokens": 16, "timeout_seconds": 5}).json()
    done = _wait_eval(client, ev["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["samples"] == 3 and math.isfinite(done["result"]["heldout_loss"])
    assert [r["task_id"] for r in _results(client, done["id"])] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "tiny-llama", "n": 3}, 400, None),                    # n > 1 needs temperature > 0
    ({"model": "tiny-llama", "n": 2, "k": [3], "temperature": 0.8}, 400, None),  # k > n
    ({"model": "no-such-model"}, 400, "model"),
    ({}, 400, None),                                                 # neither model nor completions
    ({"model": "tiny-llama", "tasks": "file-missing"}, 400, "tasks"),
])
def test_invalid_evaluations_are_refused(api, make_team, tiny_model, body, status, param):
    _, key = make_team()
    client = api(key)
    r = client.post("/evaluations", json=body)
    assert r.status_code == status, r.text
    if param:
        assert r.json()["error"]["param"] == param
    assert client.get("/evaluations").json()["data"] == []


def test_a_text_file_is_not_a_task_file(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    fid = uploaded_file_id(client, jsonl([{"text": "just prose"}]))
    r = client.post("/evaluations", json={"model": "tiny-llama", "tasks": fid})
    assert r.status_code == 400 and "mbpp or humaneval" in r.json()["error"]["message"]
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": fid, "eval": {"tasks": fid}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "eval.tasks"


def test_auto_iterate_runs_rounds_and_stops_by_rule(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    tasks = uploaded_file_id(client)
    # An unreachable target: the loop must stop on another rule (no improvement or max_rounds).
    job = create_job(client, tasks, hyperparameters={"n_epochs": 1},
                     eval={"tasks": tasks, "limit": 3, "max_tokens": 24, "timeout_seconds": 5},
                     auto_iterate={"target": {"metric": "pass@1", "min": 1.0}, "max_rounds": 3})
    done = wait_for_job(client, job["id"], timeout=900)
    assert done["status"] == "succeeded", done
    report = done["usage"]["auto_iterate"]
    rounds = report["rounds"]
    assert 2 <= len(rounds) <= 3 and [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    assert report["stop_reason"] in ("no_improvement", "max_rounds")
    if report["stop_reason"] == "no_improvement":
        assert rounds[-1]["score"] <= max(r["score"] for r in rounds[:-1])
    else:
        assert len(rounds) == 3
    assert report["best"]["score"] == max(r["score"] for r in rounds)
    children = [client.get(f"/fine_tuning/jobs/{r['job_id']}").json() for r in rounds[1:]]
    assert all(c["parent_job_id"] == job["id"] and c["status"] == "succeeded" for c in children)
    # Round 2: LoRA on every linear layer at 5x the learning rate; round 3: twice the epochs.
    assert children[0]["spec"]["lora"]["target_modules"] == ["all-linear"]
    assert children[0]["spec"]["training"]["learning_rate"] == pytest.approx(
        5 * done["spec"]["training"]["learning_rate"])
    assert children[0]["spec"]["auto_iterate"] is None
    if len(children) > 1:
        assert children[1]["spec"]["training"]["epochs"] == 2 * done["spec"]["training"]["epochs"]
        assert children[1]["spec"]["lora"]["target_modules"] == ["all-linear"]
    best_job = client.get(f"/fine_tuning/jobs/{report['best']['job_id']}").json()
    assert report["best"]["adapter_id"] == best_job["adapter_id"] is not None


def test_auto_iterate_needs_an_evaluation(api, make_team, tiny_model):
    _, key = make_team()
    client = api(key)
    r = client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": uploaded_file_id(client),
                                                "auto_iterate": {"target": {"min": 0.5}}})
    assert r.status_code == 400 and "needs eval" in r.json()["error"]["message"]
