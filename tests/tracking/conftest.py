"""A real ``mlflow server`` for the session (SQLite backend, artifacts served through it, as deployed), and jobs
run through the real worker runner in this process against it.

Jobs go through :func:`worker.runner.run_job` with the real supervisor and sandbox; a test that is about the
tracking and not about training swaps the executor for a short stand-in program (``executor``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fixtures import start_process, stop_process
from tests.support.services import free_port
from tests.support.wait import wait_until


@dataclass(frozen=True)
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        return True  # exited: stop waiting, the caller reports it
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    proc = start_process([str(Path(sys.executable).with_name("mlflow")), "server",
                          "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                          "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url, proc), 120, "the MLflow server's /health")
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        yield MlflowServer(url, proc, log)
    finally:
        stop_process(proc)


@pytest.fixture()
def tracking_uri(mlflow_server, monkeypatch) -> str:
    """This deployment tracks in the session's MLflow server (the API's pre-202 check and the worker both)."""
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "mlflow_tracking_uri", mlflow_server.url)
    return mlflow_server.url


def run_job(job_id: str, **changes) -> str:
    """The job through the worker's runner, with settings changed by ``changes``; returns how it ended."""
    from app.settings import get_settings
    from worker import runner

    return runner.run_job(job_id, get_settings().model_copy(update=changes))


def job_row(job_id: str):
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return s.get(Job, job_id)


def events(job_id: str, type: str | None = None) -> list[tuple[str, str, str]]:
    """(type, level, message) of the job's events, oldest first."""
    from sqlalchemy import select

    from app.db.models import JobEvent
    from app.db.session import session_scope

    with session_scope() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        return [(e.type, e.level, e.message) for e in rows if type is None or e.type == type]
