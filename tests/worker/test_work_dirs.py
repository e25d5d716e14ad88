"""The reaper removes the work folders a killed worker left behind, and only those of ended work."""

from __future__ import annotations

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.ids import new_id
from app.domains.jobs.models import FineTuningJob
from app.domains.jobs.spec import TrainingSpec
from app.domains.jobs.states import JobStatus
from tests.factories import create_team
from worker import reaper


def _job(team_id: str, status: JobStatus) -> str:
    job_id = new_id("ftjob")
    with session_scope() as session:
        session.add(FineTuningJob(id=job_id, team_id=team_id, model="tiny-llama", training_file="file-x",
                                  status=status, spec=TrainingSpec().model_dump(mode="json"), seed=1, attempts=1))
    return job_id


def test_the_reaper_sweeps_the_work_folders_of_ended_or_unknown_work_only(private_database, monkeypatch, tmp_path):
    # A data dir of this test's own: the session's worker keeps its claims' folders in the shared one.
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    team_id, _ = create_team()
    jobs = {status: _job(team_id, status) for status in (JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.QUEUED,
                                                        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)}
    unknown = new_id("ftjob")
    work = tmp_path / "work"
    for object_id in [*jobs.values(), unknown]:  # what a SIGKILLed claim leaves: its folder and files in it
        claim = work / object_id / "0123456789abcdef" / "checkpoints"
        claim.mkdir(parents=True)
        (claim / "adapter_model.safetensors").write_bytes(b"x" * 1024)

    swept = reaper.sweep_work_dirs()

    ended = {jobs[JobStatus.SUCCEEDED], jobs[JobStatus.FAILED], jobs[JobStatus.CANCELLED], unknown}
    assert set(swept) == ended
    assert {p.name for p in work.iterdir()} == {jobs[JobStatus.RUNNING], jobs[JobStatus.PAUSED], jobs[JobStatus.QUEUED]}
    assert reaper.sweep_work_dirs() == []
    get_settings.cache_clear()
