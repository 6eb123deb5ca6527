"""``GET /v1/jobs/{id}`` on the real API vs a bare FastAPI handler, side by side under wrk.

    .venv/bin/python -m benchmarks.api_throughput [--seconds 5] [--connections 1,8,64,256]

Needs ``wrk`` and a PostgreSQL (``--pg``, default the local one, trust auth): the script creates a
throwaway database, migrates it, creates an API key and one job row, then starts three uvicorn processes
with the same options (one process each, no access log): the real ``app.main:app``, the same with its job
cache off (``DISTILLERY_JOB_CACHE_SIZE=0``: every request reads the row, what a cache miss costs), and a
bare app whose ``async def`` handler, on the same path, returns the exact JSON body the real API answered.
All are driven with the same wrk command at each connection count (a 1 s warm-up first), in interleaved
rounds whose median makes the row; the table goes
to the ``api`` section of ``docs/benchmarks.md``.

The real side does everything a client pays for: the auth check (cached, app/auth.py), the job cache
(app/api/job_cache.py) or a pooled session with the ORM read and the response model, the telemetry
middleware. Errors are wrk's socket errors and timeouts plus non-2xx answers; ``pool timeouts`` counts 503
``database_unavailable`` lines in the API's log, so a passing row really had every request served.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.sections import write_section

ROOT = Path(__file__).resolve().parents[1]
PATH_TEMPLATE = "/v1/jobs/{job_id}"

# wrk's done() hook prints one JSON line: the numbers the table needs without parsing its text report.
WRK_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "seconds": %f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration / 1e6, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Sample:
    """One wrk run: throughput, latency percentiles (ms), and every kind of failure it saw."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors (connect/read/write) and non-2xx/3xx answers
    timeouts: int

    @classmethod
    def median(cls, runs: list[Sample]) -> Sample:
        """Median throughput and percentiles over rounds; failures are summed (any one counts)."""
        return cls(rps=statistics.median(r.rps for r in runs), p50_ms=statistics.median(r.p50_ms for r in runs),
                   p99_ms=statistics.median(r.p99_ms for r in runs), errors=sum(r.errors for r in runs),
                   timeouts=sum(r.timeouts for r in runs))

    @classmethod
    def from_wrk(cls, line: str) -> Sample:
        r = json.loads(line)
        return cls(rps=r["requests"] / r["seconds"], p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
                   errors=r["connect"] + r["read"] + r["write"] + r["status"], timeouts=r["timeout"])


def bare_app():
    """The baseline: FastAPI, same path, ``async def`` handler returning the real API's body (a uvicorn factory)."""
    from fastapi import FastAPI

    body = json.loads(Path(os.environ["BENCH_BODY_FILE"]).read_text())
    app = FastAPI()

    @app.get(PATH_TEMPLATE)
    async def get_job(job_id: str) -> dict:
        return body

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database(admin_dsn: str) -> tuple[str, str]:
    """A throwaway database; returns (its name, its SQLAlchemy URL)."""
    import psycopg

    name = f"distillery_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    auth = info.get("user", "postgres") + (f":{info['password']}" if info.get("password") else "")
    return name, f"postgresql+psycopg://{auth}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{name}"


def drop_database(admin_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(env: dict[str, str]) -> tuple[str, str]:
    """Migrate, create a key and one running job with progress and metrics (in a child process, so this
    process never caches settings). Returns (api key, job id)."""
    code = """
import json
from app.auth import create_key
from app.cli import migrate
from app.clock import utcnow
from app.db.models import Job
from app.db.session import session_scope
from app.ids import new_id
from jobspec import JobSpec

migrate()
spec = JobSpec.model_validate(JobSpec.model_config["json_schema_extra"]["examples"][0]).model_dump(mode="json")
with session_scope() as s:
    key_row, key = create_key(s, "bench")
    job = Job(id=new_id("job"), tenant_id=key_row.tenant_id, status="running", kind="distill", spec=spec,
              queue="bench", attempts=1, started_at=utcnow(),
              progress={"step_index": 0, "step_kind": "distill", "epoch": 3, "epochs": 20, "fraction": 0.15,
                        "eta_seconds": 42.0},
              metrics={"teacher": {"accuracy": 0.97}, "student": {"accuracy": 0.95, "agreement": 0.96}})
    s.add(job)
print(json.dumps([key, job.id]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    key, job_id = json.loads(out.stdout.strip().splitlines()[-1])
    return key, job_id


def start_server(target: str, port: int, env: dict[str, str], log: Path, factory: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-access-log"] + (["--factory"] if factory else [])
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{target} exited; log:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{target} did not start; log:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(url: str, key: str, connections: int, seconds: float, script: Path) -> Sample:
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
                          "-H", f"Authorization: Bearer {key}", "-s", str(script), url],
                         check=True, capture_output=True, text=True)
    return Sample.from_wrk(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def sigterm_under_load(env: dict[str, str], key: str, path: str, script: Path, work: Path) -> tuple[float, float]:
    """``distillery serve`` (what operators run) under wrk at 256 connections, sent SIGTERM after 2 s of load.
    Returns (seconds from SIGTERM to exit, the grace period it must stay within)."""
    port = free_port()
    log = work / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env={**env, "DISTILLERY_PORT": str(port)},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"distillery serve did not start; log:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)
        load = subprocess.Popen(["wrk", "-t2", "-c256", "-d10s", "--timeout", "5s", "-H", f"Authorization: Bearer {key}",
                                 "-s", str(script), f"http://127.0.0.1:{port}{path}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # let the load build up before the signal (a benchmark's pacing, not synchronisation)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        finally:
            load.kill()
            load.wait()
        return time.monotonic() - began, float(env.get("DISTILLERY_SHUTDOWN_GRACE_SECONDS", 30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pool_timeouts(log: Path) -> int:
    text = log.read_text(errors="replace")
    return text.count("database_unavailable") + text.count("QueuePool limit")


def table(rows: list[tuple[int, Sample, Sample, Sample, int]]) -> str:
    lines = ["| connections | bare rps | API rps | rps ratio | bare p50 ms | API p50 ms | bare p99 ms | API p99 ms "
             "| p99 ratio | API errors | API timeouts | pool timeouts | uncached API rps | uncached API p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, bare, api, uncached, pool in rows:
        lines.append(f"| {c} | {bare.rps:.0f} | {api.rps:.0f} | {api.rps / bare.rps:.2f} | {bare.p50_ms:.1f} "
                     f"| {api.p50_ms:.1f} | {bare.p99_ms:.1f} | {api.p99_ms:.1f} | {api.p99_ms / bare.p99_ms:.2f} "
                     f"| {api.errors} | {api.timeouts} | {pool} | {uncached.rps:.0f} | {uncached.p99_ms:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per row; the row is their median")
    parser.add_argument("--pg", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                        help="libpq DSN of a database allowed to CREATE DATABASE")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    levels = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="distillery-bench-api-"))
    db_name, db_url = create_database(args.pg)
    procs: list[subprocess.Popen] = []
    try:
        env = {**os.environ, "DISTILLERY_DATABASE_URL": db_url, "DISTILLERY_DATA_DIR": str(work / "data"),
               "DISTILLERY_SWEEP_INTERVAL_SECONDS": "0", "DISTILLERY_SANDBOX": "process"}
        key, job_id = seed(env)
        api_port, bare_port = free_port(), free_port()
        api_log, bare_log = work / "api.log", work / "bare.log"
        procs.append(start_server("app.main:app", api_port, env, api_log))
        # The same API with its job cache off: every request reads the row (what a cache miss costs).
        uncached_port, uncached_log = free_port(), work / "api-uncached.log"
        procs.append(start_server("app.main:app", uncached_port, {**env, "DISTILLERY_JOB_CACHE_SIZE": "0"},
                                  uncached_log))
        path = PATH_TEMPLATE.format(job_id=job_id)
        first = httpx.get(f"http://127.0.0.1:{api_port}{path}", headers={"Authorization": f"Bearer {key}"})
        first.raise_for_status()
        (work / "body.json").write_bytes(first.content)
        bare_env = {**env, "BENCH_BODY_FILE": str(work / "body.json")}
        procs.append(start_server("benchmarks.api_throughput:bare_app", bare_port, bare_env, bare_log, factory=True))
        bare_body = httpx.get(f"http://127.0.0.1:{bare_port}{path}").content
        assert json.loads(bare_body) == first.json(), "the bare app must answer the same body"
        script = work / "report.lua"
        script.write_text(WRK_REPORT)
        rows = []
        servers = (("bare", bare_port, bare_log), ("api", api_port, api_log), ("uncached", uncached_port, uncached_log))
        for c in levels:
            runs: dict[str, list[Sample]] = {name: [] for name, _, _ in servers}
            pool = 0
            # Rounds interleave the servers, so a burst of noise on the shared cores lands on all of them;
            # the row is the median round of each.
            for _ in range(args.rounds):
                for name, port, log in servers:
                    url = f"http://127.0.0.1:{port}{path}"
                    wrk(url, key, c, 1, script)  # warm-up: connections, pool, caches
                    before = pool_timeouts(log)
                    runs[name].append(wrk(url, key, c, args.seconds, script))
                    if name == "api":
                        pool += pool_timeouts(log) - before
            samples = {name: Sample.median(r) for name, r in runs.items()}
            rows.append((c, samples["bare"], samples["api"], samples["uncached"], pool))
            print(f"{c:>4} connections: bare {samples['bare']}  api {samples['api']}  uncached {samples['uncached']}  "
                  f"pool timeouts {pool}", flush=True)
        for p in procs:
            stop_server(p)
        stopped_in, grace = sigterm_under_load(env, key, path, script, work)
        print(f"SIGTERM under 256 connections: exited in {stopped_in:.2f} s (grace {grace:g} s)", flush=True)
    finally:
        for p in procs:
            stop_server(p)
        drop_database(args.pg, db_name)
        shutil.rmtree(work, ignore_errors=True)
    body = "\n".join([
        "## API throughput: `GET /v1/jobs/{id}` vs a bare FastAPI handler",
        "",
        f"`python -m benchmarks.api_throughput` — wrk, {args.rounds} interleaved rounds of {args.seconds:g} s per server "
        f"and row (each after a 1 s warm-up; the row is the median round, errors are summed), "
        f"{len(first.content)}-byte JSON body; one uvicorn process each (`--workers 1 --no-access-log`), "
        f"{os.cpu_count()} CPU cores ({platform.machine()}) shared by wrk, both servers and PostgreSQL "
        f"{_pg_version(args.pg)}.",
        "The bare side is an `async def` FastAPI handler on the same path returning the same body; the API side "
        "authenticates the key (cached) and answers from its job cache, which PostgreSQL's change notifications keep "
        "exact (app/api/job_cache.py); the uncached API (`DISTILLERY_JOB_CACHE_SIZE=0`, what every cache miss "
        "costs) reads the row through a pooled session and renders the response model on each request.",
        "",
        table(rows),
        "",
        "Acceptance: at 64 and 256 connections zero errors and pool timeouts, API rps ≥ 0.5 × bare and API "
        "p99 ≤ 2 × bare p99.",
        "",
        f"SIGTERM of `distillery serve` under wrk at 256 connections: exited {stopped_in:.2f} s after the signal "
        f"(grace period `DISTILLERY_SHUTDOWN_GRACE_SECONDS` = {grace:g} s).",
    ])
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "api", body)


def _pg_version(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]


if __name__ == "__main__":
    main()
