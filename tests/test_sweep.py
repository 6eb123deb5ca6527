"""The sweep (app/sweep.py) against PostgreSQL: files in a private data dir, ages set with os.utime."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import delete

from tests.support.wait import wait_until

pytestmark = pytest.mark.postgres  # against PostgreSQL, as in production with several workers

HOUR = 3600.0


def _age(path: Path, seconds: float) -> Path:
    """Set the mtime of ``path`` (and of everything in it, when a directory) ``seconds`` in the past."""
    t = time.time() - seconds
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            os.utime(p, (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def _file(path: Path, age: float, size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return _age(path, age)


@pytest.fixture()
def env(backend, tmp_path):
    """(settings, storage, data_dir) for a data dir of this test only, with the default ages."""
    from app.settings import Settings
    from app.storage import LocalStorage

    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    return settings, LocalStorage(settings.blob_dir), settings.data_dir


@pytest.fixture()
def tenant_id(backend):
    from app.db.models import Tenant
    from app.db.session import session_scope
    from app.ids import new_id

    with session_scope() as s:
        tid = new_id("tenant")
        s.add(Tenant(id=tid, name=f"sweep-{tid}"))
    yield tid
    with session_scope() as s:  # its jobs, models, datasets and artifacts go with it (ON DELETE CASCADE)
        s.execute(delete(Tenant).where(Tenant.id == tid))


def _job(tenant_id: str, status: str) -> str:
    from app.db.models import Job
    from app.db.session import session_scope
    from app.ids import new_id

    with session_scope() as s:
        jid = new_id("job")
        s.add(Job(id=jid, tenant_id=tenant_id, status=status, kind="distill", spec={}, queue="parked"))
    return jid


def _model(tenant_id: str, key: str) -> None:
    from app.db.models import Model
    from app.db.session import session_scope
    from app.ids import new_id

    with session_scope() as s:
        s.add(Model(id=new_id("model"), tenant_id=tenant_id, name="m", format="onnx", task="classification",
                    size_bytes=100, sha256="0" * 64, num_parameters=1, storage_key=key))


def _dataset(tenant_id: str, key: str) -> None:
    from app.db.models import Dataset
    from app.db.session import session_scope
    from app.ids import new_id

    with session_scope() as s:
        s.add(Dataset(id=new_id("dataset"), tenant_id=tenant_id, name="d", format="npz", num_rows=1, size_bytes=100,
                      sha256="0" * 64, has_labels=True, schema_={}, storage_key=key))


def _artifact(tenant_id: str, job_id: str, key: str) -> None:
    from app.db.models import Artifact
    from app.db.session import session_scope
    from app.ids import new_id

    with session_scope() as s:
        s.add(Artifact(id=new_id("artifact"), tenant_id=tenant_id, job_id=job_id, kind="student", format="onnx",
                       filename=key.rsplit("/", 1)[-1], media_type="application/octet-stream", size_bytes=100,
                       sha256="0" * 64, storage_key=key))


def _sweep(settings, storage):
    from app.clock import utcnow
    from app.db.session import get_sessionmaker
    from app.sweep import sweep

    with get_sessionmaker()() as session:
        return sweep(session, storage, settings, utcnow())


def test_old_temp_uploads_removed_young_kept(env):
    settings, storage, data = env
    old = _file(data / "tmp" / "upload-old", 2 * HOUR, size=1000)
    young = _file(data / "tmp" / "upload-young", 10)
    scratch = data / "tmp" / "inspect-old"
    _file(scratch / "tmp" / "x", 0, size=50)
    _age(scratch, 2 * HOUR)
    live_scratch = data / "tmp" / "inspect-live"
    _file(live_scratch / "inputs" / "upload", 2 * HOUR)
    _age(live_scratch, 2 * HOUR)
    _file(live_scratch / "tmp" / "fresh", 5)  # an inspection still writing: the newest mtime inside counts
    _age(live_scratch / "tmp", 2 * HOUR)
    _age(live_scratch / "tmp" / "fresh", 5)
    foreign = _file(data / "tmp" / "not-ours", 2 * HOUR)

    report = _sweep(settings, storage)

    assert not old.exists() and not scratch.exists()
    assert young.exists() and live_scratch.exists() and foreign.exists()
    assert (report.temp.count, report.temp.bytes) == (2, 1050)
    assert report.count == 2 and report.errors == 0


def test_temp_uploads_outlive_the_inspection_timeout(env):
    """An upload's temp file is not written while it is inspected: a short temp age does not cut that off."""
    settings, storage, data = env
    settings = settings.model_copy(update={"sweep_temp_age_seconds": 1.0, "inspect_timeout_seconds": 60.0})
    inspected = _file(data / "tmp" / "upload-being-inspected", 30)
    stale = _file(data / "tmp" / "upload-stale", 121)
    report = _sweep(settings, storage)
    assert inspected.exists() and not stale.exists()
    assert report.temp.count == 1


def test_partial_blobs_removed_by_age(env):
    settings, storage, data = env
    old = _file(data / "blobs" / "models" / "mdl_a.partial", 2 * HOUR, size=300)
    old_artifact = _file(data / "blobs" / "artifacts" / "job_x" / "art_x" / "student.onnx.partial", 2 * HOUR)
    young = _file(data / "blobs" / "datasets" / "ds_b.partial", 60)  # a copy in progress
    report = _sweep(settings, storage)
    assert not old.exists() and not old_artifact.exists() and young.exists()
    assert (report.partial.count, report.partial.bytes) == (2, 400)
    assert report.blob.count == 0


def test_referenced_blobs_kept_orphans_removed_after_the_grace_period(env, tenant_id):
    settings, storage, data = env
    blobs = data / "blobs"
    model = _file(blobs / "models" / "mdl_kept", 10 * HOUR)
    dataset = _file(blobs / "datasets" / "ds_kept", 10 * HOUR)
    _model(tenant_id, "models/mdl_kept")
    _dataset(tenant_id, "datasets/ds_kept")
    orphan_model = _file(blobs / "models" / "mdl_orphan", 2 * HOUR, size=700)
    orphan_dataset = _file(blobs / "datasets" / "ds_orphan", 2 * HOUR, size=70)
    young = _file(blobs / "models" / "mdl_young", 60)  # written, its row not committed yet
    unknown = _file(blobs / "elsewhere" / "thing", 10 * HOUR)  # no key family we know: left alone
    nested = _file(blobs / "models" / "not-a-key" / "thing", 10 * HOUR)  # models/<id> is a file, never a dir

    report = _sweep(settings, storage)

    assert model.exists() and dataset.exists() and young.exists() and unknown.exists() and nested.exists()
    assert not orphan_model.exists() and not orphan_dataset.exists()
    assert (report.blob.count, report.blob.bytes) == (2, 770)


def test_artifacts_of_ended_jobs_only(env, tenant_id):
    settings, storage, data = env
    art = data / "blobs" / "artifacts"
    done, running = _job(tenant_id, "succeeded"), _job(tenant_id, "running")
    kept = _file(art / done / "art_1" / "student.onnx", 10 * HOUR)
    _artifact(tenant_id, done, f"artifacts/{done}/art_1/student.onnx")
    orphan = _file(art / done / "art_2" / "student.onnx", 2 * HOUR)
    waiting = _file(art / running / "art_3" / "student.onnx", 2 * HOUR)  # its row comes with the final transition
    gone = _file(art / "job_gone" / "art_4" / "report.json", 2 * HOUR)

    report = _sweep(settings, storage)

    assert kept.exists() and waiting.exists()
    assert not orphan.exists() and not gone.exists()
    assert not orphan.parent.exists() and not (art / "job_gone").exists()  # emptied dirs go too
    assert report.blob.count == 2


def test_checkpoints_of_active_jobs_kept_of_ended_or_missing_removed(env, tenant_id):
    settings, storage, data = env
    ckpt = data / "blobs" / "checkpoints"
    running, queued = _job(tenant_id, "running"), _job(tenant_id, "queued")
    finished, fresh_finished = _job(tenant_id, "failed"), _job(tenant_id, "cancelled")
    for job_id, age in ((running, 2 * HOUR), (queued, 2 * HOUR), (finished, 2 * HOUR), (fresh_finished, 60),
                        ("job_gone", 2 * HOUR)):
        _file(ckpt / job_id / "checkpoint.pt", 0, size=1000)
        _age(ckpt / job_id, age)
    sync = ckpt / f".{finished}.sync"  # a sync cut off mid-copy
    _file(sync / "checkpoint.pt", 0, size=10)
    _age(sync, 2 * HOUR)
    running_sync = ckpt / f".{running}.old"
    _file(running_sync / "checkpoint.pt", 0)
    _age(running_sync, 2 * HOUR)

    report = _sweep(settings, storage)

    assert (ckpt / running).exists() and (ckpt / queued).exists() and running_sync.exists()
    assert (ckpt / fresh_finished).exists()
    assert not (ckpt / finished).exists() and not (ckpt / "job_gone").exists() and not sync.exists()
    assert (report.checkpoint.count, report.checkpoint.bytes) == (3, 2010)


def test_work_dirs_of_ended_jobs_removed(env, tenant_id):
    settings, storage, data = env
    running, finished = _job(tenant_id, "running"), _job(tenant_id, "succeeded")
    for job_id in (running, finished, "job_gone"):
        _file(data / "work" / job_id / "out" / "student.onnx", 0)
        _age(data / "work" / job_id, 2 * HOUR)
    # A worker's waiting executor (worker/prestart.py) has no job: kept for a day, then it is a crashed worker's.
    for name, age in ((".waiting-young", 2 * HOUR), (".waiting-stale", 25 * HOUR)):
        _file(data / "work" / name / "tmp" / "x", 0)
        _age(data / "work" / name, age)
    report = _sweep(settings, storage)
    assert (data / "work" / running).exists() and (data / "work" / ".waiting-young").exists()
    assert not (data / "work" / finished).exists() and not (data / "work" / "job_gone").exists()
    assert not (data / "work" / ".waiting-stale").exists()
    assert report.work.count == 3


def test_symlinks_are_never_followed_nor_removed(env, tmp_path):
    settings, storage, data = env
    outside = tmp_path / "outside"
    target = _file(outside / "precious", 10 * HOUR)
    tree = outside / "tree"
    _file(tree / "checkpoint.pt", 10 * HOUR)
    _file(tree / "upload-x", 10 * HOUR)
    _file(tree / "x.partial", 10 * HOUR)
    links = {
        data / "tmp" / "upload-link": target,
        data / "tmp" / "inspect-link": tree,
        data / "blobs" / "models" / "mdl_link": target,
        data / "blobs" / "datasets" / "ds_link.partial": target,
        data / "blobs" / "checkpoints" / "job_gone": tree,
        data / "blobs" / "artifacts" / "job_gone": tree,
        data / "blobs" / "artifacts" / "job_other" / "art_1": tree,
        data / "work" / "job_gone": tree,
    }
    for link, dest in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(dest)
        os.utime(link, (time.time() - 10 * HOUR,) * 2, follow_symlinks=False)

    report = _sweep(settings, storage)

    assert report.count == 0 and report.errors == 0
    assert all(link.is_symlink() for link in links)
    assert sorted(p.name for p in outside.rglob("*")) == ["checkpoint.pt", "precious", "tree", "upload-x", "x.partial"]


def test_nothing_outside_the_data_dir(backend, tmp_path, caplog):
    """A blob store that is a link out of the data dir is not swept (and says so)."""
    from app.settings import Settings
    from app.storage import LocalStorage

    settings = Settings(data_dir=tmp_path / "linked")
    data = settings.data_dir
    data.mkdir()
    elsewhere = tmp_path / "volume"
    orphan = _file(elsewhere / "models" / "mdl_orphan", 10 * HOUR)
    (data / "blobs").symlink_to(elsewhere)
    (data / "tmp").symlink_to(elsewhere / "models")
    caplog.set_level(logging.WARNING, logger="distillery.sweep")
    report = _sweep(settings, LocalStorage(data / "blobs"))
    assert orphan.exists() and report.count == 0
    assert "outside the data dir" in caplog.text


def test_one_log_line_when_something_was_removed(env, caplog):
    settings, storage, data = env
    caplog.set_level(logging.INFO, logger="distillery.sweep")
    _sweep(settings, storage)
    assert not [r for r in caplog.records if r.name == "distillery.sweep"]
    _file(data / "tmp" / "upload-a", 2 * HOUR, size=2048)
    _file(data / "blobs" / "models" / "mdl_b.partial", 2 * HOUR, size=1024)
    _sweep(settings, storage)
    lines = [r.getMessage() for r in caplog.records if r.name == "distillery.sweep"]
    assert lines == ["sweep removed 1 temp (2.0 KiB), 1 partial (1.0 KiB)"]


def test_start_sweeper_sweeps_at_once_then_periodically(env):
    from app.sweep import start_sweeper

    settings, _storage, data = env
    assert start_sweeper(settings.model_copy(update={"sweep_interval_seconds": 0})) is None
    first = _file(data / "tmp" / "upload-first", 2 * HOUR)
    sweeper = start_sweeper(settings.model_copy(update={"sweep_interval_seconds": 0.05}))
    assert sweeper is not None and sweeper.thread.daemon
    try:
        _until(lambda: not first.exists())
        second = _file(data / "tmp" / "upload-second", 2 * HOUR)
        _until(lambda: not second.exists())
    finally:
        sweeper.stop()
    assert not sweeper.thread.is_alive()


def test_cli_sweep_once(backend, capsys):
    from app.cli import main
    from app.settings import get_settings

    stale = _file(get_settings().data_dir / "tmp" / "upload-cli-test", 2 * HOUR, size=10)
    assert main(["sweep"]) == 0
    assert not stale.exists()
    assert "sweep removed" in capsys.readouterr().out


def _until(condition, timeout: float = 10.0) -> None:
    wait_until(condition, timeout, "the sweeper", every=0.02)
