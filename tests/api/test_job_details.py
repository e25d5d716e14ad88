"""Job details as OpenAI has them: a 64-character suffix, a random seed when none is given,
estimated_finish only while a job runs, and metadata=null in the list filter."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import wait_until
from tests.factories import demo_tasks


@pytest.fixture
def oai(server, make_team):
    _, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def training_file(oai) -> str:
    return oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune").id


def _cancel_all(client: openai.OpenAI) -> None:
    for job in client.fine_tuning.jobs.list():
        if job.status not in ("succeeded", "failed", "cancelled"):
            client.fine_tuning.jobs.cancel(job.id)


def test_a_suffix_of_64_characters_with_dots_names_the_model(oai, training_file, tiny_model):
    from app.domains.jobs.service import model_name

    suffix = "v1.2-" + "a" * 55 + "_x.y"
    assert len(suffix) == 64
    job = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file, suffix=suffix)
    try:
        assert job.user_provided_suffix == suffix
        name = model_name(base="tiny-llama", team_name="team", suffix=suffix, job_id=job.id)
        assert name.split(":") == ["ft", "tiny-llama", "team", suffix, job.id]
    finally:
        _cancel_all(oai)


@pytest.mark.parametrize("suffix", ["a" * 65, "with:colon", "with/slash", "has space", ""],
                         ids=["65-characters", "colon", "slash", "space", "empty"])
def test_a_suffix_that_would_break_the_model_name_is_refused(oai, training_file, tiny_model, suffix):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file, suffix=suffix)
    assert exc.value.body["param"] == "suffix"
    assert list(oai.fine_tuning.jobs.list()) == []


def test_a_job_without_a_seed_gets_a_random_one_reported_and_trained_with(oai, training_file, tiny_model):
    try:
        seeds = []
        for _ in range(3):
            job = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
            assert 0 <= job.seed < 2**31
            assert job.to_dict()["spec"]["seed"] == job.seed  # the spec the worker trains with
            assert oai.fine_tuning.jobs.retrieve(job.id).seed == job.seed
            seeds.append(job.seed)
        assert len(set(seeds)) == 3  # three draws from 2**31 collide with odds ~1e-9
        given = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file, seed=7)
        assert given.seed == 7 and given.to_dict()["spec"]["seed"] == 7
    finally:
        _cancel_all(oai)


def test_metadata_null_lists_the_jobs_without_metadata(oai, training_file, tiny_model):
    try:
        bare = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
        tagged = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file, metadata={"run": "a"})
        empty = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file, metadata={})
        assert {j.id for j in oai.fine_tuning.jobs.list()} == {bare.id, tagged.id, empty.id}
        without = [j.id for j in oai.fine_tuning.jobs.list(extra_query={"metadata": "null"})]
        assert sorted(without) == sorted([bare.id, empty.id])
        assert [j.id for j in oai.fine_tuning.jobs.list(metadata={"run": "a"})] == [tagged.id]
        with pytest.raises(openai.BadRequestError) as exc:
            oai.fine_tuning.jobs.list(extra_query={"metadata": "none"})
        assert exc.value.body["param"] == "metadata"
    finally:
        _cancel_all(oai)


def test_estimated_finish_is_cleared_when_a_running_job_pauses(oai, training_file, worker):
    job = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file,
                                      extra_body={"training": {"epochs": 50}})
    try:
        running = wait_until(lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).estimated_finish and j,
                             timeout=180, message="the running job's first ETA")
        assert running.status == "running" and running.estimated_finish >= running.created_at
        paused = oai.fine_tuning.jobs.pause(job.id)
        if paused.status != "paused":  # the answer waits a few seconds for the worker, which may be slower
            paused = wait_until(lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j,
                                timeout=120, message="the job to pause")
        assert paused.estimated_finish is None
        resumed = oai.fine_tuning.jobs.resume(job.id)
        assert resumed.status == "queued" and resumed.estimated_finish is None
    finally:
        _cancel_all(oai)
    assert oai.fine_tuning.jobs.retrieve(job.id).estimated_finish is None
