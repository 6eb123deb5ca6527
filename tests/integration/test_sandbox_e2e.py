"""Hostile uploads through the real API and worker: what runs in the sandbox stays in it.

The attack is the one TorchScript makes possible: a scripted ``__setstate__`` runs at ``torch.jit.load``
and may call ``torch.save`` (write any file the process can) and ``torch.from_file`` (read any file into
a tensor that then flows into the teacher's outputs and from there into the student). Under bubblewrap
the executor sees neither the host's /tmp, nor the data dir, nor any other tenant's blob.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.flow import wait_for
from tests.support.jobs import job_body
from tests.support.teachers import npz_bytes

pytestmark = pytest.mark.integration

SECRET = b"TOPSECRET-do-not-leak-0123456789"


def _require_bwrap() -> None:
    from app import sandbox

    if sandbox.resolve_mode("auto") != "bwrap":
        if os.environ.get("CI") == "true":
            pytest.fail("bubblewrap is required under CI (make sandbox installs it)")
        pytest.skip("bubblewrap is not available: process mode does not hide the host's files")


class Evil(torch.nn.Module):
    """A digits-shaped linear teacher (64 → 10) whose unpickling writes ``marker`` and reads ``secret``."""

    def __init__(self, marker: str, secret: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(10, 64) * 0.1)
        self.bias = torch.nn.Parameter(torch.zeros(10))
        self.marker, self.secret = marker, secret
        self.leak = torch.zeros(32)

    def forward(self, x):
        return x @ self.weight.t() + self.bias + self.leak[:10]

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, str, bool]:
        return (self.weight, self.bias, self.leak, self.marker, self.secret, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, str, bool]) -> None:
        self.weight, self.bias = state[0], state[1]
        self.marker, self.secret, self.training = state[3], state[4], state[5]
        torch.save(torch.ones(3), self.marker)
        self.leak = torch.from_file(self.secret, False, 32, dtype=torch.uint8).float()


@pytest.fixture()
def attack(tmp_path):
    """(evil TorchScript bytes, marker path, secret path): both paths on the host, outside any sandbox."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    marker = tmp_path / "marker.pt"
    path = tmp_path / "evil.pt"
    torch.jit.script(Evil(str(marker), str(secret))).save(str(path))
    # It really is an attack: loaded outside the sandbox, it writes the marker and reads the secret.
    leaked = torch.jit.load(str(path)).leak
    assert marker.exists() and bytes(leaked.to(torch.uint8).tolist()) == SECRET
    marker.unlink()
    return path.read_bytes(), marker, secret


def test_a_torchscript_payload_cannot_touch_the_host_at_upload(http, attack):
    _require_bwrap()
    content, marker, _secret = attack
    r = http.post("/v1/models", files={"file": ("evil.pt", content)}, data={"name": "evil"})
    assert r.status_code == 422, r.text  # the load fails inside the sandbox: neither path exists there
    assert "cannot be loaded" in r.json()["detail"], r.text
    assert not marker.exists()


def _plant(http, content: bytes) -> str:
    """A model registered with a benign file whose blob is then replaced by ``content`` — as if an
    inspection had been fooled, or the file was accepted before this deployment ran inspections."""
    import hashlib

    from app.db.models import Model
    from app.db.session import session_scope
    from app.storage import get_storage

    benign = torch.jit.script(torch.nn.Linear(64, 10))
    path = Path(os.environ["DISTILLERY_DATA_DIR"]) / "tmp" / f"benign-{os.getpid()}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    benign.save(str(path))
    r = http.post("/v1/models", files={"file": ("t.pt", path.read_bytes())}, data={"name": "planted"})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    with session_scope() as s:
        row = s.get(Model, model_id)
        get_storage().local_path(row.storage_key).write_bytes(content)
        row.sha256, row.size_bytes = hashlib.sha256(content).hexdigest(), len(content)
    return model_id


def test_a_torchscript_payload_in_a_job_reads_and_writes_nothing_of_the_host(http, attack, digits):
    _require_bwrap()
    content, marker, _secret = attack
    teacher = _plant(http, content)
    ds = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=digits.x_train, y=digits.y_train))},
                   data={"name": "d", "format": "npz"})
    assert ds.status_code == 201, ds.text
    r = http.post("/v1/jobs", json=job_body(teacher, ds.json()["id"], exports=["torchscript", "onnx"]))
    assert r.status_code == 202, r.text
    job = wait_for(http, r.json()["id"], timeout=120)
    assert job["status"] in ("failed", "succeeded"), job
    if job["status"] == "failed":
        assert job["error"]["code"] not in ("internal_error", "executor_crashed"), job["error"]
    assert not marker.exists()
    for art in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]:
        body = http.get(f"/v1/artifacts/{art['id']}/content").content
        assert SECRET not in body and SECRET[:16] not in body, art


def test_the_executor_holds_no_credentials_and_no_network(http, teacher_files, digits):
    m = http.post("/v1/models", files={"file": ("t.pt", teacher_files["torchscript"].read_bytes())},
                  data={"name": "t"}).json()["id"]
    d = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=digits.x_train[:300], y=digits.y_train[:300]))},
                  data={"name": "d", "format": "npz"}).json()["id"]
    job = wait_for(http, http.post("/v1/jobs", json=job_body(m, d)).json()["id"])
    assert job["status"] == "succeeded", job
    events = http.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    seen = next(e["data"] for e in events if e["type"] == "executor_started")
    names = set(seen["env"])
    assert not {n for n in names if n.startswith("DISTILLERY_") or n.endswith("_URL") or "SECRET" in n
                or n.startswith(("AWS_", "PG", "REDIS", "CELERY"))}, names
    assert names <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE",
                     "PYTHONUNBUFFERED", "MPLCONFIGDIR", "MPLBACKEND", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                     "TORCHINDUCTOR_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TZ",
                     "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE", "PWD"}, names
    from app import sandbox

    if sandbox.resolve_mode("auto") == "bwrap":
        assert seen["network_interfaces"] == ["lo"] and seen["uid"] != 0, seen
        # The worker started this executor before the job came (worker/prestart.py): same sandbox, same view.
        assert seen["prestarted"] is True, seen


# ---- cancel in every phase ---------------------------------------------------------------------------------
def _events(http, job_id: str) -> list[dict]:
    return http.get(f"/v1/jobs/{job_id}/events").json()["data"]


def _cancel_when(http, job_id: str, ready, timeout: float = 120) -> float:
    """Cancel once ``ready(job, events)``; returns the seconds from the cancel request to ``cancelled``."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job  # it must not end before the phase we want
        if job["status"] == "running" and ready(job, _events(http, job_id)):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    asked = time.monotonic()
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    final = wait_for(http, job_id, timeout=30)
    assert final["status"] == "cancelled", final
    return time.monotonic() - asked


@pytest.fixture()
def inputs(http, teacher_files, digits):
    """A teacher, the digits rows as npz, and 40k rows as csv (slow to parse: a loading phase to hit)."""
    import numpy as np

    m = http.post("/v1/models", files={"file": ("t.pt", teacher_files["torchscript"].read_bytes())},
                  data={"name": "t"}).json()["id"]
    d = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=digits.x_train, y=digits.y_train))},
                  data={"name": "d", "format": "npz"}).json()["id"]
    rows = np.tile(digits.x_train, (28, 1))[:40_000]
    header = ",".join(f"px{i}" for i in range(64))
    text = header + "\n" + "\n".join(",".join(f"{v:.3f}" for v in r) for r in rows) + "\n"
    big = http.post("/v1/datasets", files={"file": ("d.csv", text.encode())}, data={"name": "big", "format": "csv"})
    assert big.status_code == 201, big.text
    return m, d, big.json()["id"]


@pytest.mark.parametrize("phase", ["loading", "training", "exporting"])
def test_cancel_ends_the_job_within_seconds_in_any_phase(http, inputs, phase):
    m, small, big = inputs
    if phase == "exporting":
        # A wide student exported to both formats, verified and measured: seconds of work after training.
        body = job_body(m, small, student={"family": "mlp", "hidden": [2048, 2048, 2048]},
                        steps=[{"kind": "distill", "epochs": 1, "batch_size": 512}], exports=["torchscript", "onnx"])
        ready = lambda job, ev: any(e["type"] == "step_finished" for e in ev)  # noqa: E731
    elif phase == "training":
        body = job_body(m, small, steps=[{"kind": "distill", "epochs": 500}])
        ready = lambda job, ev: (job.get("progress") or {}).get("epoch", 0) >= 1  # noqa: E731
    else:
        body = job_body(m, big, steps=[{"kind": "distill", "epochs": 500}])
        ready = lambda job, ev: not any(e["type"] == "load" for e in ev)  # noqa: E731
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    took = _cancel_when(http, r.json()["id"], ready)
    assert took < 5.0, f"cancel while {phase} took {took:.1f}s"


def test_the_worker_survives_a_crashed_executor(http, celery_worker, teacher_files, digits):
    """After a job whose executor the kernel killed (SIGKILL from outside, like the OOM killer), the same
    worker runs the next job to the end."""
    import signal

    m = http.post("/v1/models", files={"file": ("t.pt", teacher_files["torchscript"].read_bytes())},
                  data={"name": "t"}).json()["id"]
    d = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=digits.x_train, y=digits.y_train))},
                  data={"name": "d", "format": "npz"}).json()["id"]
    job_id = http.post("/v1/jobs", json=job_body(m, d, steps=[{"kind": "distill", "epochs": 500}])).json()["id"]
    deadline = time.monotonic() + 120
    while (http.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("epoch", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = _kill_executor(celery_worker.pid, signal.SIGKILL)
    assert killed, "no executor process found for the job"
    job = wait_for(http, job_id, timeout=30)
    assert (job["status"], job["error"]["code"]) == ("failed", "executor_crashed"), job
    assert "SIGKILL" in job["error"]["message"]
    nxt = wait_for(http, http.post("/v1/jobs", json=job_body(m, d)).json()["id"])
    assert nxt["status"] == "succeeded", nxt


def _kill_executor(worker_pid: int, sig: int) -> int:
    """Signal the engine process of the job worker ``worker_pid`` is running: its descendant running
    ``worker.executor`` (inside bwrap). A worker runs one job at a time and starts its next executor only once
    that job has ended (worker/prestart.py), so while a job runs that is the job's."""
    parent, cmdline = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue

    def under_worker(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == worker_pid:
                return True
        return False

    count = 0
    for pid, cmd in cmdline.items():
        if b"worker.executor" in cmd and b"bwrap" not in cmd[0] and under_worker(pid):
            try:
                os.kill(pid, sig)
                count += 1
            except ProcessLookupError:
                pass
    return count


def test_http_is_unreachable_from_the_executor():
    """No network namespace escape: a socket to the API's port fails inside bwrap (process mode: skipped)."""
    _require_bwrap()
    import socket
    import tempfile

    from app import sandbox

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "    print('CONNECTED')\nexcept OSError as e:\n    print('REFUSED', e)\n")
        with tempfile.TemporaryDirectory() as scratch:
            run = sandbox.run_to_end([sys.executable, "-c", code], scratch=Path(scratch), inputs={},
                                     limits=sandbox.Limits(memory_bytes=1 << 30, wall_seconds=30), mode="bwrap")
    out = b"".join(run.lines).decode()
    assert out.startswith("REFUSED"), out
