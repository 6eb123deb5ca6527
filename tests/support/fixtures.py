"""Fixtures: the database a test runs on, API client, API keys, a real Celery worker process, trained teachers.

Which database: tests marked ``integration`` or ``postgres`` run on PostgreSQL (+ Redis), created on first use;
every other test that asks for one (``backend``, ``client``, ``make_key`` ...) runs on SQLite, the default
deployment (tests.support.backends).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import backends, jobs, run, services, teachers
from tests.support.backends import Backend
from tests.support.shared import built_once, shared_root
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
PARKED_QUEUE = run.PARKED_QUEUE


#: Fixtures that start long-lived real processes or servers (a Celery worker, `distillery serve` on PostgreSQL +
#: Redis, a chaos stack, an MLflow server): a test that uses one is end to end, and marked ``slow``.
PROCESS_FIXTURES = frozenset({"celery_worker", "api_url", "chaos_stack", "mlflow_server"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` = the end-to-end set: the integration set (PostgreSQL + Redis + real worker processes) and every
    test that starts long-lived processes, besides the tests marked ``slow`` by hand (whole jobs trained to
    accuracy floors, processes killed or timed out on purpose). ``pytest -m "not slow"`` is the quick loop."""
    for item in items:
        if item.get_closest_marker("slow") is None and (
                item.get_closest_marker("integration") is not None
                or PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("chaos") is not None:
            # Under pytest-xdist (``--dist loadgroup``, as `make test` runs) the chaos suite runs on one worker, one
            # module after the other: two stacks side by side would fight for the CPU whose timings they assert.
            item.add_marker(pytest.mark.xdist_group("chaos"))
        elif item.get_closest_marker("slow") is not None:
            # A slow module stays on one worker: its module-scoped servers and workers start once.
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    # Longest first (the chaos suite, then the other slow tests), so that the quick tests fill the other workers
    # while the long ones run instead of leaving one worker alone at the end. The sort is stable: each group
    # keeps the order of its files.
    items.sort(key=lambda item: 0 if item.get_closest_marker("chaos") else 1 if item.get_closest_marker("slow") else 2)


#: Tests that load the shared trained language-model teacher (tests/support/lm.py: shared_teacher).
_LM_TEACHER_MODULES = ("tests/integration/test_lm_e2e.py",)
_prebuild: subprocess.Popen | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """When this run will need the shared LM teacher, the first worker starts building it in the background at
    once (:func:`tests.support.lm.prebuild_shared_teacher`), at the lowest CPU priority."""
    global _prebuild
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" or not any(
            "lm_teacher" in getattr(item, "fixturenames", ()) or item.nodeid.startswith(_LM_TEACHER_MODULES)
            for item in session.items):
        return
    from tests.support.lm import prebuild_shared_teacher

    root = shared_root(session.config._tmp_path_factory)
    _prebuild = prebuild_shared_teacher(root, root / "lm-teacher-prebuild.log")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _prebuild is not None and _prebuild.poll() is None:  # the run ended before it was needed
        _prebuild.kill()
        _prebuild.wait()


def wants_postgres(node: pytest.Item) -> bool:
    return node.get_closest_marker("postgres") is not None or node.get_closest_marker("integration") is not None


@pytest.fixture(scope="session")
def sqlite_backend() -> Backend:
    """The default: a migrated SQLite database in this run's data dir (no server)."""
    backend = backends.sqlite(run.TMP)
    backends.migrate(backend)
    return backend


@pytest.fixture(scope="session")
def postgres_backend() -> Iterator[Backend]:
    """A migrated database of its own on the local PostgreSQL, Redis as broker; dropped at the end."""
    backend = backends.create_postgres(run.TMP)
    try:
        backends.migrate(backend)
        yield backend
    finally:
        backends.drop(backend)
        import redis

        r = redis.Redis.from_url(services.REDIS_URL)
        for queue in (run.PARKED_QUEUE, run.QUEUE):
            r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


@pytest.fixture(autouse=True)
def _postgres_for_marked_tests(request) -> None:
    """A test marked ``integration`` or ``postgres`` runs on PostgreSQL whatever it asks for (its helpers open
    sessions of their own)."""
    if wants_postgres(request.node):
        backends.activate(request.getfixturevalue("postgres_backend"))


@pytest.fixture()
def backend(request) -> Backend:
    """The migrated database this test runs on (SQLite unless it is marked ``integration`` / ``postgres``)."""
    chosen = request.getfixturevalue("postgres_backend" if wants_postgres(request.node) else "sqlite_backend")
    backends.activate(chosen)
    return chosen


@pytest.fixture()
def client(backend, monkeypatch):
    """In-process API client. Jobs it creates go to a queue no worker consumes, so tests that
    inspect or move a queued job never race the session's real worker."""
    from fastapi.testclient import TestClient

    from app.main import app
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "job_queue", PARKED_QUEUE)
    with TestClient(app) as c:
        yield c


@pytest.fixture()
def make_key(backend) -> Callable[[str], dict[str, str]]:
    """``make_key("tenant-a")`` → Authorization headers for a new key of that tenant."""
    return backend.key


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> teachers.Digits:
    with built_once(tmp_path_factory, "digits") as (out, build):
        if build:
            teachers.save_digits(teachers.digits(), out / "digits.npz")
        return teachers.load_digits(out / "digits.npz")


@pytest.fixture(scope="session")
def teacher_files(tmp_path_factory, digits) -> dict[str, Path]:
    """A digits MLP teacher trained here (once per run), saved as TorchScript and as ONNX."""
    with built_once(tmp_path_factory, "teachers") as (out, build):
        if build:
            model = teachers.train_mlp_teacher(digits)
            teachers.save_torchscript(model, out / "teacher.pt")
            teachers.save_onnx(model, out / "teacher.onnx")
    return {"torchscript": out / "teacher.pt", "onnx": out / "teacher.onnx"}


@pytest.fixture(scope="session")
def digits_npz(digits) -> bytes:
    return teachers.npz_bytes(x=digits.x_train, y=digits.y_train, x_val=digits.x_test, y_val=digits.y_test)


@pytest.fixture()
def executor(monkeypatch):
    """``executor(code)``: the next job's executor runs ``code`` (cwd: its scratch; ``job.json`` there) instead of
    the engine, through the real supervisor and sandbox; ``send(message)`` writes one protocol line."""
    from worker import supervisor

    def use(code: str) -> None:
        program = "import json, os, sys\ndef send(m): print(json.dumps(m), flush=True)\n" + textwrap.dedent(code)
        monkeypatch.setattr(supervisor, "executor_argv", lambda job_file: [sys.executable, "-c", program])

    return use


def start_process(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_log(proc: subprocess.Popen, log_path: Path, needle: str, timeout: float) -> None:
    """Wait until ``needle`` appears in ``log_path``; fails at once if ``proc`` exits first (with the log)."""
    def seen() -> bool:
        return needle in log_path.read_text(errors="replace") or proc.poll() is not None

    try:
        wait_until(seen, timeout, f"{needle!r} in {log_path.name}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{log_path.read_text(errors='replace')[-3000:]}") from None
    if needle not in log_path.read_text(errors="replace"):
        raise AssertionError(f"exited ({proc.returncode}) before {needle!r}; log:\n"
                             f"{log_path.read_text(errors='replace')[-3000:]}")


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
def celery_worker(postgres_backend, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """A real ``distillery worker`` process on PostgreSQL + Redis, consuming this run's private queue."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_process([sys.executable, "-m", "app.cli", "worker"], log, env=postgres_backend.env)
    proc.log_path = log  # type: ignore[attr-defined]
    wait_for_log(proc, log, "ready.", timeout=60)
    yield proc
    stop_process(proc)


#: (backend name, teacher format) → what the first real upload in this process stored: per row, its column
#: values and a copy of its blob.
_UPLOADED: dict[tuple[str, str], list[tuple[type, dict, Path]]] = {}


@pytest.fixture()
def uploaded(client, backend, teacher_files, digits_npz):
    """``uploaded(headers, fmt="onnx")`` → (model_id, dataset_id) owned by that key's tenant.

    The first call per backend and format uploads through the API (the model is inspected in the sandbox);
    later tenants get copies of the rows and blobs that upload stored: a second inspection of the same bytes
    proves nothing new (the upload path is what tests/api/test_models.py and its neighbours test)."""

    def _upload(headers: dict[str, str], fmt: str = "onnx") -> tuple[str, str]:
        if (backend.name, fmt) in _UPLOADED:
            return _copy_uploads(headers, _UPLOADED[(backend.name, fmt)])
        m = client.post("/v1/models", headers=headers, files={"file": ("t", teacher_files[fmt].read_bytes())},
                        data={"name": "teacher"})
        d = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", digits_npz)},
                        data={"name": "digits", "format": "npz"})
        assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
        _UPLOADED[(backend.name, fmt)] = _remember_uploads(m.json()["id"], d.json()["id"])
        return m.json()["id"], d.json()["id"]

    return _upload


def _remember_uploads(model_id: str, dataset_id: str) -> list[tuple[type, dict, Path]]:
    from app.db.models import Dataset, Model
    from app.db.session import session_scope
    from app.storage import get_storage

    kept = run.TMP / "uploads"
    kept.mkdir(exist_ok=True)
    out = []
    with session_scope() as s:
        for cls, row_id in ((Model, model_id), (Dataset, dataset_id)):
            row = s.get(cls, row_id)
            values = {c.key: getattr(row, c.key) for c in cls.__mapper__.column_attrs
                      if c.key not in ("id", "tenant_id", "storage_key", "created_at")}
            get_storage().get_file(row.storage_key, kept / row_id)
            out.append((cls, values, kept / row_id))
    return out


def _copy_uploads(headers: dict[str, str], rows: list[tuple[type, dict, Path]]) -> tuple[str, str]:
    """New rows and blobs like ``rows`` for the tenant of ``headers``; returns their ids (model, dataset)."""
    import copy

    from app.auth import authenticate
    from app.db.models import Model
    from app.db.session import session_scope
    from app.ids import new_id
    from app.storage import get_storage

    ids = []
    with session_scope() as s:
        tenant_id = authenticate(s, headers["Authorization"]).tenant_id
        for cls, values, blob_path in rows:
            kind, prefix = ("model", "models") if cls is Model else ("dataset", "datasets")
            row_id = new_id(kind)
            blob = get_storage().put_file(f"{prefix}/{row_id}", blob_path)
            s.add(cls(**copy.deepcopy(values), id=row_id, tenant_id=tenant_id, storage_key=blob.key))
            ids.append(row_id)
    return ids[0], ids[1]


@pytest.fixture()
def queued_job(client, make_key, uploaded) -> str:
    h = make_key("runner")
    m, d = uploaded(h)
    return client.post("/v1/jobs", headers=h, json=jobs.job_body(m, d)).json()["id"]
