"""The worker on S3 storage: inputs come through the verified cache, checkpoints live in the bucket, so a job
released by one worker resumes on another that shares nothing with it but the database and the bucket."""

from __future__ import annotations

import time

from tests.support.jobs import RELEASING_EXECUTOR, run_until_released


def _job(job_id: str):
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return s.get(Job, job_id)


def _events(job_id: str) -> list:
    from sqlalchemy import select

    from app.db.models import JobEvent
    from app.db.session import session_scope

    with session_scope() as s:
        return [(e.type, e.message, e.data) for e in
                s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))]


def _copy_inputs_to(storage, job_id: str) -> None:
    """The job's model and dataset blobs, uploaded through the API to local storage, copied to ``storage``."""
    import tempfile
    from pathlib import Path

    from app.db.models import Dataset, Model
    from app.db.session import session_scope
    from app.storage import get_storage

    job = _job(job_id)
    with session_scope() as s, tempfile.TemporaryDirectory() as tmp:
        for row in (s.get(Model, job.teacher_model_id), s.get(Dataset, job.dataset_id)):
            get_storage().get_file(row.storage_key, Path(tmp) / "blob")
            storage.put_file(row.storage_key, Path(tmp) / "blob")


def test_a_released_job_resumes_on_another_worker_from_the_bucket(queued_job, executor, s3_server, tmp_path):  # noqa: F811
    from app.storage import storage_for
    from worker import checkpoints, runner

    url = f"s3://{s3_server.bucket()}/distillery"
    first = s3_server.settings(url, data_dir=tmp_path / "worker-a")
    second = s3_server.settings(url, data_dir=tmp_path / "worker-b")
    storage = storage_for(first)
    _copy_inputs_to(storage, queued_job)
    executor(RELEASING_EXECUTOR)
    assert run_until_released(queued_job, first)[0] == "released"
    token = checkpoints.latest(storage, queued_job)
    assert token is not None
    assert {b.key.split(f"{token}/")[1] for b in storage.list(f"checkpoints/{queued_job}")} == {
        "checkpoint.pt", "artifacts/step0.onnx"}

    began = time.monotonic()
    assert runner.run_job(queued_job, second) == "succeeded"  # a worker with its own data dir and cache
    print(f"S3 resume on a second worker: {time.monotonic() - began:.1f} s")
    events = _events(queued_job)
    resumed = [m for t, m, _ in events if t == "resumed"]
    assert resumed == ["epoch 7"]
    fetched = [d for t, _, d in events if t == "inputs_fetched"]
    assert [(d["downloaded"], d["cached"]) for d in fetched] == [(2, 0), (2, 0)]  # each worker its own cache
    assert list(storage.list(f"checkpoints/{queued_job}")) == []  # deleted after the guarded end
    for data_dir in (first.data_dir, second.data_dir):
        assert not (data_dir / "blobs").exists()  # nothing under the local blob folder
        assert len(list((data_dir / "cache" / "blobs").glob("[0-9a-f]" * 64))) == 2
