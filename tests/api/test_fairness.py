"""Under load: a flood from one team is answered 429 while other teams are served, and a create that
committed is never answered as a failure."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import httpx
import pytest

from app.core.db import session_scope
from app.domains.jobs import service as jobs
from tests.api.servers import embedded_instance, private_api
from tests.factories import demo_tasks, uploaded_file_id


def _client(base: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def _async_client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                             limits=httpx.Limits(max_connections=200))


@pytest.mark.parametrize("database", ["postgres", "embedded"])
def test_no_503_for_a_committed_create_under_a_pool_squeezed_to_two_connections(
        request, services_env, make_team, tiny_model, tmp_path, database):
    squeezed = {"TUNEFORGE_DATABASE__POOL_SIZE": "2", "TUNEFORGE_DATABASE__MAX_OVERFLOW": "0",
                "TUNEFORGE_DATABASE__API_THREADS": "8", "TUNEFORGE_DATABASE__POOL_TIMEOUT_SECONDS": "1"}
    with contextlib.ExitStack() as stack:
        if database == "embedded":
            squeezed |= stack.enter_context(embedded_instance(tmp_path, tiny_model))
        else:
            # The 60 jobs stay queued: a database and a queue of their own, which no worker serves.
            squeezed |= {"TUNEFORGE_DATABASE_URL": request.getfixturevalue("private_database"),
                         "TUNEFORGE_TRAINING_QUEUE": f"unserved-{secrets.token_hex(3)}"}
        team_id, key = make_team()
        base = stack.enter_context(private_api(services_env, **squeezed))
        with _client(base, key) as client:
            file_id = uploaded_file_id(client, demo_tasks())

        async def create(tag: str) -> tuple[str, int]:
            async with _async_client(base, key) as client:
                r = await client.post("/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                                  "metadata": {"tag": tag}})
                return tag, r.status_code

        async def burst() -> list[tuple[str, int]]:
            return await asyncio.gather(*(create(secrets.token_hex(6)) for _ in range(60)))

        answers = asyncio.run(burst())
        with session_scope() as session:
            created = {job.metadata["tag"] for job in _all_jobs(session, team_id)}
    answered_ok = {tag for tag, status in answers if 200 <= status < 300}
    assert answered_ok, answers  # the squeezed pool still serves
    assert created == answered_ok, {"created but refused": sorted(created - answered_ok),
                                    "answered but missing": sorted(answered_ok - created),
                                    "statuses": sorted({s for _, s in answers})}


def _all_jobs(session, team_id: str) -> list:
    page = jobs.list_page(session, team_id=team_id, after=None, limit=100)
    assert not page.has_more
    return page.data


def _multipart_head(boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()


def test_a_flood_from_one_team_gets_429_while_another_team_is_served(services_env, make_team):
    _, key_a = make_team()
    _, key_b = make_team()
    limits = {"TUNEFORGE_CONCURRENCY__PER_KEY": "3", "TUNEFORGE_CONCURRENCY__PER_TEAM": "5"}
    with private_api(services_env, **limits) as base, _client(base, key_a) as a, _client(base, key_b) as b:
        second_key_a = a.post("/keys", json={"name": "second", "role": "member"}).json()["key"]

        async def scenario() -> None:
            release = asyncio.Event()

            async def trickle():
                boundary = "slowboundary"
                yield _multipart_head(boundary)
                while not release.is_set():  # a byte now and then, as a slow client sends
                    yield b" "
                    await asyncio.sleep(0.1)
                yield b'{"text": "x"}\n\r\n--' + boundary.encode() + b"--\r\n"

            async def slow_upload(key: str) -> int | str:
                """The status, or the error of an upload whose connection was closed on refusal."""
                async with _async_client(base, key) as client:
                    try:
                        r = await client.post("/files", content=trickle(),
                                              headers={"Content-Type": "multipart/form-data; boundary=slowboundary"})
                    except httpx.TransportError as exc:
                        return type(exc).__name__
                    return r.status_code

            async def get(client: httpx.AsyncClient, path: str) -> httpx.Response:
                return await client.get(path)

            # Key A1 fills its 3 slots, key A2 two more: the team's 5 are taken, by requests that hold
            # no connection while their bodies trickle in.
            keys = [key_a] * 3 + [second_key_a] * 2
            uploads = [asyncio.create_task(slow_upload(k)) for k in keys]
            async with _async_client(base, key_a) as a1, _async_client(base, second_key_a) as a2, \
                    _async_client(base, key_b) as bb:
                deadline = asyncio.get_running_loop().time() + 60
                while (r := await a2.get("/files")).status_code != 429:
                    assert r.status_code == 200, r.text
                    assert asyncio.get_running_loop().time() < deadline, "the slow uploads never took their slots"
                    # An upload that raced this poll for the team's last slot was refused: send it again,
                    # and poll again once it has had time to arrive.
                    refused = [i for i, upload in enumerate(uploads) if upload.done()]
                    for i in refused:
                        assert uploads[i].result() != 200
                        uploads[i] = asyncio.create_task(slow_upload(keys[i]))
                    await asyncio.sleep(1.0 if refused else 0.2)
                assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
                assert "this team" in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
                flood = await asyncio.gather(*(get(a1, "/fine_tuning/jobs") for _ in range(100)))
                assert {f.status_code for f in flood} == {429}
                assert all(f.json()["error"]["code"] == "concurrency_limit_exceeded" for f in flood)
                assert "this key" in flood[0].json()["error"]["message"]
                # Team B, at its key's limit of 3 at once, is served in full.
                for _ in range(3):
                    served = await asyncio.gather(*(get(bb, "/fine_tuning/jobs") for _ in range(3)))
                    assert [s.status_code for s in served] == [200] * 3
                release.set()
                assert set(await asyncio.gather(*uploads)) <= {200, 400}
                # The slots are given back once the requests end.
                assert (await a1.get("/fine_tuning/jobs")).status_code == 200

        asyncio.run(scenario())
        assert b.get("/quotas").status_code == 200


def test_failed_authentications_are_limited_per_client_address(services_env, make_team):
    _, key = make_team()
    # The embedded broker keeps the buckets in the process: no other test's failures count here.
    limits = {"TUNEFORGE_RATE_LIMIT__FAILED_AUTH_BURST": "5", "TUNEFORGE_RATE_LIMIT__FAILED_AUTH_PER_SECOND": "0.01",
              "TUNEFORGE_BROKER_URL": ""}
    with private_api(services_env, **limits) as base, _client(base, "sk-wrong") as wrong, \
            _client(base, None) as anonymous, _client(base, key) as right:
        assert [wrong.get("/files").status_code for _ in range(5)] == [401] * 5
        for r in (wrong.get("/files"), anonymous.post("/fine_tuning/jobs", json={})):
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "authentication_rate_limit_exceeded"
            assert int(r.headers["Retry-After"]) >= 1
        assert right.get("/files").status_code == 200  # a valid key from the address is still served
