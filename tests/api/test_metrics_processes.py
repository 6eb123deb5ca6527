"""``/metrics`` with two real API processes on one metrics dir: every scrape shows the sums, whichever process
answers; job series come from the database once (not once per process); a stopped process keeps its counts
and leaves the live gauges; ``distillery serve`` starts from an empty dir."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fixtures import start_process, stop_process
from tests.support.flow import wait_http
from tests.support.services import free_port

pytestmark = pytest.mark.slow  # two real API processes


def _samples(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _jobs(tenant_id: str, kind: str, queue: str) -> None:
    """Two ended jobs of ``kind`` (2 s and 100 s of run time), one cancelled before it started, two queued."""
    from app.clock import utcnow
    from app.db.models import Job
    from app.db.session import session_scope
    from app.ids import new_id

    now = utcnow()
    rows = [("succeeded", now - timedelta(seconds=2)), ("succeeded", now - timedelta(seconds=100)),
            ("cancelled", None), ("queued", None), ("queued", None)]
    with session_scope() as s:
        for status, started in rows:
            s.add(Job(id=new_id("job"), tenant_id=tenant_id, status=status, kind=kind, spec={}, queue=queue,
                      started_at=started, finished_at=now if status in ("succeeded", "cancelled") else None))


def test_two_api_processes_share_one_exposition(sqlite_backend, make_key, tmp_path):
    from app.auth import authenticate
    from app.db.session import session_scope

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # What an earlier server left: a counter file of a process long gone. 'distillery serve' must not sum it.
    env = {**sqlite_backend.env, "DISTILLERY_METRICS_DIR": str(metrics_dir), "DISTILLERY_SWEEP_INTERVAL_SECONDS": "0",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    subprocess.run([sys.executable, "-c", "from prometheus_client import Counter; Counter('distillery_http_requests', "
                    "'', ['method', 'route', 'status']).labels('GET', '/healthz', '200').inc(1000)"],
                   env=env, check=True)
    assert list(metrics_dir.glob("counter_*.db"))

    headers = make_key("metrics-processes")
    with session_scope() as s:
        tenant_id = authenticate(s, headers["Authorization"]).tenant_id
    kind, queue = f"probe{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}"
    _jobs(tenant_id, kind, queue)

    port_a, port_b = free_port(), free_port()
    a = start_process([sys.executable, "-m", "app.cli", "serve"], tmp_path / "a.log",
                      env={**env, "DISTILLERY_PORT": str(port_a)})
    b = None
    try:
        url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        wait_http(url_a, timeout=120)
        # The second process joins the running server's metrics dir (it does not empty it).
        b = start_process([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                           str(port_b)], tmp_path / "b.log", env=env)
        wait_http(url_b, timeout=120)
        for url, n in ((url_a, 5), (url_b, 7)):
            for _ in range(n):
                assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        # wait_http counted one /healthz per process too (a poll that found the process up).
        healthz = {"method": "GET", "route": "/healthz", "status": "200"}
        got_a, got_b = _samples(url_a), _samples(url_b)
        for got in (got_a, got_b):
            assert _value(got, "distillery_http_requests_total", **healthz) == 5 + 7 + 2
            assert _value(got, "distillery_jobs_finished_total", kind=kind, status="succeeded") == 2
            assert _value(got, "distillery_jobs_finished_total", kind=kind, status="cancelled") == 1
            assert _value(got, "distillery_queue_depth", queue=queue) == 2
            hist = {le: _value(got, "distillery_job_duration_seconds_bucket", kind=kind, status="succeeded", le=le)
                    for le in ("1.0", "5.0", "60.0", "120.0", "+Inf")}
            assert hist == {"1.0": 0, "5.0": 1, "60.0": 1, "120.0": 2, "+Inf": 2}, hist
            assert _value(got, "distillery_job_duration_seconds_count", kind=kind, status="succeeded") == 2
            assert 101 < _value(got, "distillery_job_duration_seconds_sum", kind=kind, status="succeeded") < 103
        # Both processes answered: each one's scrape is in the other's count.
        scrape = {"method": "GET", "route": "/metrics", "status": "200"}
        assert _value(_samples(url_a), "distillery_http_requests_total", **scrape) == 2  # counted after answering

        b_pid = b.pid
        assert (metrics_dir / f"gauge_livesum_{b_pid}.db").exists()
        stop_process(b)  # SIGTERM: uvicorn shuts the app down (lifespan), then exits by the signal
        assert "Application shutdown complete" in (tmp_path / "b.log").read_text()
        assert not (metrics_dir / f"gauge_livesum_{b_pid}.db").exists()  # marked dead on its way out
        after = _samples(url_a)
        assert _value(after, "distillery_http_requests_total", **healthz) == 14  # its requests still count
        assert _value(after, "distillery_http_requests_in_flight") == 1  # only this scrape, in A
    finally:
        for proc in (b, a):
            if proc is not None:
                stop_process(proc)
