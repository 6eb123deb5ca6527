"""Chaos: the database goes away for 20 s in the middle of a job, on a PostgreSQL cluster this test starts
itself (``initdb`` + ``pg_ctl`` on a free port), with a Redis of its own and real API and worker processes.

The API answers 503 ``database_unavailable`` with ``Retry-After`` (never 500, no traceback per request);
the worker keeps its attempt through the outage (writes retried with backoff, the reaper waiting for
heartbeats to catch up although every lease ran out meanwhile); the job moves again within 15 s of the
database coming back and succeeds with ``attempts == 1``.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.chaos import Stack, throwaway_postgres, throwaway_redis, upload_inputs, wait_until
from tests.support.jobs import job_body

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite

OUTAGE = 12.0
LEASE = 6  # shorter than the outage: every lease expires while the database is away


def test_a_database_outage_answers_503_and_the_job_resumes(tmp_path, teacher_files, digits_npz):
    with throwaway_postgres() as pg, throwaway_redis(tmp_path) as redis:
        st = Stack(tmp_path, pg.url, redis.url, {"DISTILLERY_LEASE_SECONDS": str(LEASE),
                                                  "DISTILLERY_CHECKPOINT_SECONDS": "0"})
        try:
            st.migrate()
            headers = st.key("outage")
            api = st.api()
            worker = st.worker("w", wait=False)
            m, d = upload_inputs(api, headers, teacher_files["torchscript"], digits_npz)
            st.wait_ready(worker, "w")
            with httpx.Client(base_url=api.url, headers=headers, timeout=30) as c:
                job_id = c.post("/v1/jobs", json=job_body(m, d, steps=[{"kind": "distill", "epochs": 150,
                                                                          "batch_size": 16}], exports=[])).json()["id"]
                wait_until(lambda: st.job(job_id)["progress"].get("epoch", 0) >= 2, 90, "training to start")
                epoch_before = st.job(job_id)["progress"]["epoch"]
                st.engine.dispose()
                pg.stop()
                down = time.monotonic()
                answers, slowest = [], 0.0
                while time.monotonic() - down < OUTAGE:
                    for method, path, body in (("GET", f"/v1/jobs/{job_id}", None), ("GET", "/v1/jobs", None),
                                               ("POST", "/v1/jobs", job_body(m, d)), ("GET", "/readyz", None)):
                        began = time.monotonic()
                        r = c.request(method, path, json=body)
                        slowest = max(slowest, time.monotonic() - began)
                        answers.append((path, r.status_code, r.headers.get("retry-after"),
                                        r.json().get("code") if r.content else None))
                    time.sleep(0.5)  # pacing the probes over the outage, not synchronisation
                pg.start()
                up = time.monotonic()
                back = wait_until(lambda: c.get(f"/v1/jobs/{job_id}").status_code == 200, 30, "the API to answer")
                resumed = wait_until(lambda: st.job(job_id)["progress"].get("epoch", 0) > epoch_before + 1
                                     or st.job(job_id)["status"] != "running", 60, "the job to move again")
                wait_until(lambda: st.job(job_id)["status"] in ("succeeded", "failed", "cancelled"), 240,
                           "the job to end")
            job = st.job(job_id)
        finally:
            st.close()
        log = st.log_text("api")
    bad = [a for a in answers if a[1] != 503 or a[3] != "database_unavailable" or not a[2]]
    assert answers and not bad, bad[:5]
    assert log.count("Traceback") == 0, log[-3000:]
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert job["events"].count("started") == 1 and "requeued" not in job["events"], job["events"]
    print(f"CHAOS PostgreSQL stopped {OUTAGE:.0f} s mid-job (lease {LEASE} s): {len(answers)} requests during the "
          f"outage all 503 database_unavailable with Retry-After (slowest {slowest:.2f} s); the API answered "
          f"{back:.1f} s and the job moved {resumed:.1f} s after the database was back "
          f"({time.monotonic() - up:.0f} s to the end); attempts == 1")
    assert resumed < 15
