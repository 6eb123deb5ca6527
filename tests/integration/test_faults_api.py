"""Chaos: the API is killed (SIGKILL) while clients submit with Idempotency-Keys. Real processes on a Redis and a
database of their own (:mod:`tests.integration.chaos_stack`)."""

from __future__ import annotations

import signal
import threading
import uuid

import httpx
import pytest

from tests.integration.chaos_stack import client_of, tiny
from tests.support.chaos import TERMINAL, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite


def test_kill_9_of_the_api_mid_submission_makes_each_job_once(chaos_stack):
    """kill -9 the API while clients submit with Idempotency-Keys; restart it; the clients retry each key: exactly
    one job per key, whether its first request died before, during or after the commit."""
    m, d = chaos_stack.inputs
    keys = [f"chaos-{uuid.uuid4().hex}" for _ in range(40)]
    answered: dict[str, str] = {}
    stop = threading.Event()

    def submit(my_keys: list[str]) -> None:
        with httpx.Client(base_url=chaos_stack.http.url, headers=chaos_stack.headers, timeout=10) as c:
            for k in my_keys:
                if stop.is_set():
                    return
                try:
                    r = c.post("/v1/jobs", json=tiny(m, d), headers={"Idempotency-Key": k})
                    if r.status_code == 202:
                        answered[k] = r.json()["id"]
                except httpx.HTTPError:
                    return  # the API died under us

    threads = [threading.Thread(target=submit, args=(keys[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(answered) >= 8, 60, "some submissions to land")
    chaos_stack.http.proc.send_signal(signal.SIGKILL)
    chaos_stack.http.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    chaos_stack.http = chaos_stack.api("api-restarted")
    with client_of(chaos_stack) as c:
        replayed = {k: c.post("/v1/jobs", json=tiny(m, d), headers={"Idempotency-Key": k}) for k in keys}
    assert all(r.status_code == 202 for r in replayed.values()), [r.text for r in replayed.values()][:3]
    ids = {k: r.json()["id"] for k, r in replayed.items()}
    assert all(ids[k] == v for k, v in answered.items()), "a replay must return the job its first request made"
    rows = chaos_stack._rows("SELECT key, resource_id FROM idempotency_records WHERE key = ANY(:keys)", keys=keys)
    assert len(rows) == len(keys) and len(set(ids.values())) == len(keys)
    # What matters here is that each key made one job; running all of them would only repeat the load test.
    with client_of(chaos_stack) as c:
        for job_id in ids.values():
            assert c.post(f"/v1/jobs/{job_id}/cancel").status_code in (202, 409)
    jobs = list(ids.values())
    wait_until(lambda: all(s in TERMINAL for s in chaos_stack.statuses(jobs).values()), 120, "the jobs to end")
    ended = chaos_stack.jobs(jobs)
    assert all(v["status"] in ("succeeded", "cancelled") and v["attempts"] <= 1 and v["events"].count("started") <= 1
               for v in ended.values()), ended
    print(f"CHAOS API kill -9 mid-submission: {len(answered)} of {len(keys)} answered before the kill; after the "
          f"restart every key maps to one job ({len(keys)} in all), none started twice")
