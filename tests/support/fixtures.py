"""Fixtures: migrated database, API client, API keys, a real Celery worker process, trained teachers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import services, teachers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def services_up() -> None:
    services.require("PostgreSQL", "127.0.0.1", 5432)
    services.require("Redis", "127.0.0.1", 6379)


@pytest.fixture(scope="session")
def migrated(services_up) -> None:
    from app.cli import migrate

    migrate()


@pytest.fixture()
def client(migrated, monkeypatch):
    """In-process API client. Jobs it creates go to a queue no worker consumes, so tests that
    inspect or move a queued job never race the session's real worker."""
    from fastapi.testclient import TestClient

    from app.main import app
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "job_queue", PARKED_QUEUE)
    with TestClient(app) as c:
        yield c


PARKED_QUEUE = f"parked-{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _drop_parked_queue():
    yield
    if services.reachable("127.0.0.1", 6379):
        import redis

        from tests.conftest import QUEUE

        r = redis.Redis.from_url(services.REDIS_URL)
        for queue in (PARKED_QUEUE, QUEUE):
            r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


@pytest.fixture(scope="session")
def make_key(migrated) -> Callable[[str], dict[str, str]]:
    """``make_key("tenant-a")`` → Authorization headers for a new key of that tenant."""
    from app.auth import create_key
    from app.db.session import session_scope

    def _make(tenant: str) -> dict[str, str]:
        with session_scope() as s:
            _row, key = create_key(s, tenant)
        return {"Authorization": f"Bearer {key}"}

    return _make


@pytest.fixture(scope="session")
def digits() -> teachers.Digits:
    return teachers.digits()


@pytest.fixture(scope="session")
def teacher_files(tmp_path_factory, digits) -> dict[str, Path]:
    """A digits MLP teacher trained here, saved as TorchScript and as ONNX."""
    out = tmp_path_factory.mktemp("teachers")
    model = teachers.train_mlp_teacher(digits)
    return {"torchscript": teachers.save_torchscript(model, out / "teacher.pt"),
            "onnx": teachers.save_onnx(model, out / "teacher.onnx")}


@pytest.fixture(scope="session")
def digits_npz(digits) -> bytes:
    return teachers.npz_bytes(x=digits.x_train, y=digits.y_train, x_val=digits.x_test, y_val=digits.y_test)


def start_process(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_log(proc: subprocess.Popen, log_path: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not seen within {timeout}s; log:\n{log_path.read_text(errors='replace')[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def celery_worker(migrated, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """A real ``distillery worker`` process consuming this run's private queue."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_process([sys.executable, "-m", "app.cli", "worker"], log)
    proc.log_path = log  # type: ignore[attr-defined]
    wait_for_log(proc, log, "ready.", timeout=60)
    yield proc
    stop_process(proc)


@pytest.fixture()
def uploaded(client, teacher_files, digits_npz):
    """``uploaded(headers)`` → (model_id, dataset_id) owned by that key's tenant."""

    def _upload(headers: dict[str, str], fmt: str = "onnx") -> tuple[str, str]:
        m = client.post("/v1/models", headers=headers, files={"file": ("t", teacher_files[fmt].read_bytes())},
                        data={"name": "teacher"})
        d = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", digits_npz)},
                        data={"name": "digits", "format": "npz"})
        assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
        return m.json()["id"], d.json()["id"]

    return _upload
