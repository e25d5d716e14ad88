from __future__ import annotations

import pytest

from tests.factories import create_job, uploaded_file_id, wait_for_job


@pytest.fixture(scope="module")
def trained(server, worker, services_env):
    """A team with one succeeded job (and its adapter), trained by the real worker."""
    import httpx

    from tests.factories import create_team

    team_id, key = create_team()
    client = httpx.Client(base_url=f"{server}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    file_id = uploaded_file_id(client)
    job = create_job(client, file_id, suffix="e2e", hyperparameters={"n_epochs": 1})
    job = wait_for_job(client, job["id"])
    assert job["status"] == "succeeded", job
    yield {"team_id": team_id, "key": key, "file_id": file_id, "job": job, "client": client}
    client.close()
