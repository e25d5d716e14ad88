"""Files as OpenAI keeps them: expires_after (and the reaper that deletes expired files, but not
while an unfinished job needs them), order and limit on the list, and the purposes."""

from __future__ import annotations

import datetime as dt

import openai
import pytest
from sqlalchemy import update

from tests.conftest import wait_until
from tests.factories import demo_tasks, jsonl

HOUR = 3600


@pytest.fixture
def oai(server, make_team):
    _, key = make_team()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    yield client
    client.close()


def _expire_now(file_id: str) -> None:
    """Move the file's expiry into the past, as if its expires_after had run out."""
    from app.core.db import session_scope, utcnow
    from app.domains.files.models import File

    with session_scope() as session:
        session.execute(update(File).where(File.id == file_id).values(expires_at=utcnow() - dt.timedelta(seconds=1)))


def _blob_exists(file_id: str) -> bool:
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.domains.files.models import File

    with session_scope() as session:
        row = session.get(File, file_id)
        key = row.storage_key if row is not None else None
    return key is not None and get_storage().exists(key)


def _storage_key(file_id: str) -> str:
    from app.core.db import session_scope
    from app.domains.files.models import File

    with session_scope() as session:
        return session.get_one(File, file_id).storage_key


def test_expires_after_sets_expires_at_from_created_at(oai):
    f = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune",
                         expires_after={"anchor": "created_at", "seconds": 2 * HOUR})
    assert f.expires_at is not None and f.expires_at - f.created_at == 2 * HOUR
    assert oai.files.retrieve(f.id).expires_at == f.expires_at
    never = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    assert never.expires_at is None


@pytest.mark.parametrize(("expires_after", "param"), [
    ({"anchor": "created_at", "seconds": HOUR - 1}, "expires_after.seconds"),
    ({"anchor": "created_at", "seconds": 30 * 24 * HOUR + 1}, "expires_after.seconds"),
    ({"anchor": "last_active_at", "seconds": HOUR}, "expires_after.anchor"),
    ({"anchor": "created_at"}, "expires_after.seconds"),
], ids=["under-an-hour", "over-30-days", "other-anchor", "no-seconds"])
def test_expires_after_outside_openais_range_is_refused_and_stores_nothing(oai, expires_after, param):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune", expires_after=expires_after)
    assert exc.value.body["param"] == param
    assert list(oai.files.list()) == []


def test_an_unknown_form_field_is_refused_not_ignored(api, make_team):
    _, key = make_team()
    client = api(key)
    r = client.post("/files", data={"purpose": "fine-tune", "expires_at": "1"},
                    files={"file": ("d.jsonl", demo_tasks(), "application/jsonl")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_at"
    assert client.get("/files").json()["data"] == []


def test_the_reaper_deletes_an_expired_file_and_its_blob(oai):
    from worker.reaper import delete_expired_files

    f = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune",
                         expires_after={"anchor": "created_at", "seconds": HOUR})
    key = _storage_key(f.id)
    kept = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune",
                            expires_after={"anchor": "created_at", "seconds": HOUR})
    assert f.id not in delete_expired_files()  # not expired yet
    _expire_now(f.id)
    assert f.id in delete_expired_files()
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.content(f.id)
    from app.core.storage import get_storage

    assert not get_storage().exists(key)
    assert [x.id for x in oai.files.list()] == [kept.id] and _blob_exists(kept.id)


def test_a_file_a_live_job_needs_is_kept_until_the_job_ends(oai, tiny_model):
    from worker.reaper import delete_expired_files

    f = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune",
                         expires_after={"anchor": "created_at", "seconds": HOUR})
    job = oai.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, extra_body={"training": {"epochs": 50}})
    oai.fine_tuning.jobs.pause(job.id)
    # A worker may have claimed it first; then it pauses at its next step. Paused is live either way.
    wait_until(lambda: oai.fine_tuning.jobs.retrieve(job.id).status == "paused", timeout=120,
               message="the job to pause")
    _expire_now(f.id)
    assert f.id not in delete_expired_files()
    assert oai.files.retrieve(f.id).id == f.id and _blob_exists(f.id)

    assert oai.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert f.id in delete_expired_files()
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(f.id)


def test_a_job_on_an_expired_file_is_refused(oai, tiny_model):
    f = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune",
                         expires_after={"anchor": "created_at", "seconds": HOUR})
    _expire_now(f.id)
    with pytest.raises(openai.BadRequestError) as exc:
        oai.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    assert exc.value.body["param"] == "training_file" and exc.value.body["code"] == "file_expired"
    assert list(oai.fine_tuning.jobs.list()) == []


def test_an_evaluation_on_an_expired_task_file_is_refused(oai, tiny_model):
    f = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune",
                         expires_after={"anchor": "created_at", "seconds": HOUR})
    _expire_now(f.id)
    with pytest.raises(openai.BadRequestError) as exc:
        oai.post("/evaluations", cast_to=object, body={"model": "tiny-llama", "tasks": f.id})
    assert exc.value.body["param"] == "tasks" and exc.value.body["code"] == "file_expired"
    assert oai.get("/evaluations", cast_to=object)["data"] == []


def test_the_list_follows_order_and_pages_both_ways(oai):
    ids = [oai.files.create(file=(f"{i}.jsonl", demo_tasks()), purpose="fine-tune").id for i in range(3)]
    assert [f.id for f in oai.files.list()] == ids[::-1]  # newest first by default
    assert [f.id for f in oai.files.list(order="desc")] == ids[::-1]
    first = oai.files.list(order="asc", limit=2)
    assert [f.id for f in first.data] == ids[:2] and first.has_more
    assert [f.id for f in oai.files.list(order="asc", limit=2, after=ids[1]).data] == ids[2:]
    assert [f.id for f in oai.files.list(order="asc", limit=2)] == ids  # the client walks the pages
    assert [f.id for f in oai.files.list(order="desc", limit=1, after=ids[2]).data] == [ids[1]]


def test_limit_goes_up_to_ten_thousand(oai):
    f = oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose="fine-tune")
    assert [x.id for x in oai.files.list(limit=10_000).data] == [f.id]
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.list(limit=10_001)
    assert exc.value.body["param"] == "limit"
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.list(order="sideways")  # type: ignore[arg-type]
    assert exc.value.body["param"] == "order"


def test_user_data_is_stored_as_sent_and_usable_by_no_job(oai, tiny_model):
    content = b"%PDF-1.4\n\x00\x01 not JSONL at all\n"
    f = oai.files.create(file=("notes.pdf", content), purpose="user_data")
    assert (f.purpose, f.bytes) == ("user_data", len(content))
    assert oai.files.content(f.id).content == content
    assert [x.id for x in oai.files.list(purpose="user_data")] == [f.id]
    assert list(oai.files.list(purpose="fine-tune")) == []
    for param in ("training_file", "validation_file"):
        body = {"training_file": f.id} if param == "training_file" else {
            "training_file": oai.files.create(file=("t.jsonl", demo_tasks()), purpose="fine-tune").id,
            "validation_file": f.id}
        with pytest.raises(openai.BadRequestError) as exc:
            oai.fine_tuning.jobs.create(model="tiny-llama", **body)
        assert exc.value.body["param"] == param and "user_data" in exc.value.message
    # Valid training records under user_data are still user_data: not validated, not trained on.
    records = oai.files.create(file=("t.jsonl", jsonl([{"prompt": "a", "completion": "b"}])), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        oai.fine_tuning.jobs.create(model="tiny-llama", training_file=records.id)
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.create(file=("empty.bin", b""), purpose="user_data")
    assert exc.value.body["param"] == "file"


@pytest.mark.parametrize("purpose", ["assistants", "batch", "vision", "fine-tune-results", "other"])
def test_other_purposes_are_refused_naming_those_that_exist(oai, purpose):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.files.create(file=("tasks.jsonl", demo_tasks()), purpose=purpose)  # type: ignore[arg-type]
    assert exc.value.body["param"] == "purpose"
    assert "fine-tune, evals, user_data" in exc.value.message
    assert list(oai.files.list()) == []


def test_a_results_file_whose_transaction_rolls_back_leaves_no_blob(services_env, make_team):
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.domains.files import service as files
    from app.domains.files.models import File

    team_id, _ = make_team()
    keys: list[str] = []
    with pytest.raises(RuntimeError):
        with session_scope() as session:
            row = files.create_results(session, team_id=team_id, storage=get_storage(),
                                       rows=[(1, 0.5, None, None, None)])
            keys.append(row.storage_key)
            assert get_storage().exists(row.storage_key)
            raise RuntimeError("the transaction fails after the file was written")
    assert not get_storage().exists(keys[0])
    with session_scope() as session:
        assert session.get(File, row.id) is None
