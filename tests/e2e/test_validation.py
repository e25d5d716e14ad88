"""Validation through the real worker and API: a split of the training file, validation losses in the
events and in OpenAI's checkpoint objects, the best step in the usage; a split that cannot be made
fails the job with the reason."""

from __future__ import annotations

from tests.factories import all_events, create_job, jsonl, uploaded_file_id, wait_for_job


def test_a_split_job_reports_validation_losses_in_events_checkpoints_and_usage(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    job = create_job(client, uploaded_file_id(client), seed=3,
                     training={"max_steps": 4, "gradient_accumulation_steps": 1, "validation_split": 0.1,
                               "eval_every_steps": 2, "checkpoint_every_steps": 2})
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    usage = done["usage"]
    assert (usage["validation_source"], usage["validation_records"], usage["select_best"]) == ("split", 4, "valid_loss")

    events = all_events(client, job["id"])
    [split] = [e for e in events if e["message"].startswith("Validation split:")]
    assert split["data"]["validation_records"] == 4 and split["data"]["training_records"] == 36
    losses = {e["data"]["step"]: e["data"]["valid_loss"] for e in events
              if e["type"] == "metrics" and "valid_loss" in (e["data"] or {})}
    assert sorted(losses) == [2, 4]
    best = min(losses, key=losses.get)
    assert (usage["best_step"], usage["best_valid_loss"], usage["adapter_step"]) == (best, losses[best], best)
    assert any(e["message"].startswith("The adapter holds the weights of") for e in events)

    page = client.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert {c["step_number"]: c["metrics"]["valid_loss"] for c in page["data"]} == losses


def test_a_split_that_leaves_no_training_record_fails_the_job_with_the_reason(api, make_team, worker):
    _, key = make_team()
    client = api(key)
    one = jsonl([{"prompt": "def one():\n", "completion": "    return 1\n"}])
    job = create_job(client, uploaded_file_id(client, one), training={"validation_split": 0.5})
    done = wait_for_job(client, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "training_error"
    assert "validation_split" in done["error"]["message"] and "each side needs at least one" in done["error"]["message"]
