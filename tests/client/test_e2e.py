"""The SDK and the CLI, installed into a venv of their own (no torch, nothing of the server), against a real
API process and a real worker on the default SQLite backend.

The venv is built once per run (``pip install client/[cli]``, from the package index); the server boots
meanwhile. The SDK walks the whole flow (upload, create, wait with progress, events, download + sha256, a
resumed download); the CLI runs ``distill jobs create spec.json --wait`` for a job that succeeds (exit 0) and
for one that fails at job start (exit 1, the server's message printed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fixtures import ROOT, stop_process, wait_for_log
from tests.support.flow import wait_http
from tests.support.shared import built_once

pytestmark = pytest.mark.slow  # real processes, a package install, three whole jobs: 35 s on two idle cores

SCRIPT = Path(__file__).with_name("sdk_flow_script.py")
SERVER_PACKAGES = ("torch", "app", "worker", "engine", "jobspec", "fastapi", "sqlalchemy")


def _interpreter() -> str:
    """This venv's Python, its directory resolved: the sandbox binds the interpreter's resolved directories, so
    a venv reached through a symlink must be named by its real path for the executor to find its Python."""
    exe = Path(sys.executable)
    return str(exe.parent.resolve() / exe.name)


def _build_venv(target: Path) -> None:
    source = target.parent / "client-src"  # a copy: building in client/ would leave build/ there
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    # This environment's pip installs into the new venv (--python): the same result as the venv's own pip.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "-q",
                    f"{source}[cli]"], check=True, capture_output=True)


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory) -> Path:
    with built_once(tmp_path_factory, "client-venv") as (out, build):
        if build:
            _build_venv(out / "venv")
    return out / "venv"


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    """``{"url", "key", "venv", "env"}``: `distillery run` (API + worker, SQLite) in a data dir of its own."""
    data = tmp_path_factory.mktemp("sdk-stack")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_DATA_DIR=str(data), DISTILLERY_PORT=str(port), DISTILLERY_DEVICE="cpu",
               DISTILLERY_WORKER_THREADS="1")
    log = data / "run.log"
    # Not start_process: that adds this process's DISTILLERY_* (the test run's own database) back in.
    proc = subprocess.Popen([_interpreter(), "-m", "app.cli", "run"], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        venv = request.getfixturevalue("client_venv")  # built while the server boots
        url = f"http://127.0.0.1:{port}"
        wait_for_log(proc, log, "ready.", timeout=90)  # the worker is consuming (fails at once if it exited)
        wait_http(url)
        keys = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "sdk"], cwd=ROOT,
                              env=env, capture_output=True, text=True, check=True)
        key = keys.stdout.strip().splitlines()[-1]
        client_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        client_env.update(DISTILLERY_URL=url, DISTILLERY_API_KEY=key)
        yield {"url": url, "key": key, "venv": venv, "env": client_env, "log": log}
    finally:
        stop_process(proc)


def in_venv(stack, args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a program of the client venv (``python``, ``distill``) from ``cwd`` (never the repository root: the
    server's packages must not be importable through the working directory)."""
    program = str(stack["venv"] / "bin" / args[0])
    return subprocess.run([program, *args[1:]], cwd=cwd, env=stack["env"], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sdk_run(stack, teacher_files, digits_npz, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sdk-flow")
    (work / "digits.npz").write_bytes(digits_npz)
    done = in_venv(stack, ["python", str(SCRIPT), str(teacher_files["torchscript"]), str(work / "digits.npz"),
                           str(work / "out")], work)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_client_venv_has_the_sdk_and_nothing_of_the_server(stack, tmp_path):
    code = (f"import importlib.util, distillery_client; "
            f"print([m for m in {SERVER_PACKAGES!r} if importlib.util.find_spec(m) is not None])")
    done = in_venv(stack, ["python", "-c", code], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
    assert in_venv(stack, ["distill", "--help"], tmp_path).returncode == 0


def test_the_sdk_walks_the_whole_flow(sdk_run):
    import torch

    assert all(sdk_run["absent"].values()), sdk_run["absent"]
    assert sdk_run["status"] == "succeeded" and sdk_run["student_accuracy"] is not None
    # wait(progress=...) saw the job move forward to its end.
    statuses = [s for s, _ in sdk_run["progress"]]
    assert statuses[-1] == "succeeded" and "running" in statuses
    fractions = [f for _, f in sdk_run["progress"] if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # The live stream and the JSON pages hold the same events, in order, from queued to succeeded.
    assert sdk_run["followed"] == sdk_run["paged"]
    types = [t for _, t in sdk_run["followed"]]
    assert types[0] == "queued" and types[-1] == "succeeded" and "started" in types
    # The student came down whole, verified, and again from a half-written partial (a Range request).
    assert sdk_run["downloaded_sha256"] == sdk_run["resumed_sha256"] == sdk_run["student"]["sha256"]
    half = sdk_run["student"]["size_bytes"] // 2
    assert sdk_run["ranges"] == [None, f"bytes={half}-"]
    assert not Path(sdk_run["resumed"] + ".part").exists()
    student = Path(sdk_run["downloaded"])
    assert hashlib.sha256(student.read_bytes()).hexdigest() == sdk_run["student"]["sha256"]
    with torch.inference_mode():
        assert torch.jit.load(str(student))(torch.zeros(3, 64)).shape == (3, 10)
    assert sdk_run["job_id"] in sdk_run["listed"] and "train_loss" in sdk_run["metric_names"]
    assert sdk_run["async"] == ["succeeded", [sdk_run["job_id"]], sdk_run["artifact_ids"]]


def _spec(sdk_run: dict, student: dict, path: Path) -> Path:
    path.write_text(json.dumps({"teacher_model_id": sdk_run["model_id"], "dataset_id": sdk_run["dataset_id"],
                                "student": student, "steps": [{"kind": "distill", "epochs": 1}],
                                "exports": ["torchscript"]}))
    return path


def test_distill_jobs_create_wait_exits_0_for_a_job_that_succeeds(stack, sdk_run, tmp_path):
    spec = _spec(sdk_run, {"family": "mlp", "hidden": [16]}, tmp_path / "spec.json")
    done = in_venv(stack, ["distill", "jobs", "create", str(spec), "--wait"], tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "succeeded" in done.stdout and "compression ratio" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_distill_jobs_create_wait_exits_1_with_the_servers_message_for_a_job_that_fails(stack, sdk_run, tmp_path):
    # A convolutional student for rows of 64 features: refused as the job starts (shape_mismatch).
    from distillery_client import Client

    spec = _spec(sdk_run, {"family": "cnn"}, tmp_path / "spec.json")
    done = in_venv(stack, ["distill", "jobs", "create", str(spec), "--wait"], tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    with Client(stack["url"], stack["key"]) as client:
        job = next(iter(client.jobs.list(max_items=1)))
    assert job.status == "failed" and job.error.code == "shape_mismatch" and job.error.message
    assert f"job {job.id} failed: {job.error.message} (shape_mismatch)" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
