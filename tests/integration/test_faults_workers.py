"""Chaos: a worker freezes (SIGSTOP) past its lease mid-job and the other worker takes over. Real processes on a Redis and a database of their own (:mod:`tests.integration.chaos_stack`); recovery times
are printed (``pytest -s -n0``) and recorded in docs/operations.md."""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.chaos_stack import LEASE, client_of, long, tiny
from tests.support.chaos import TERMINAL, signal_tree, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite


def test_a_frozen_worker_is_replaced_and_its_stale_attempt_changes_nothing(chaos_stack):
    """Freeze (SIGSTOP) the worker running a job for longer than its lease: the other worker requeues and
    finishes it; when the frozen one wakes, its attempt is fenced out and writes nothing."""
    m, d = chaos_stack.inputs
    with client_of(chaos_stack) as c:
        job_id = c.post("/v1/jobs", json=long(m, d, epochs=20)).json()["id"]
    wait_until(lambda: chaos_stack.job(job_id)["progress"].get("epoch", 0) >= 2, 90, "training to start")
    holder = chaos_stack._rows("SELECT worker_id FROM jobs WHERE id = :id", id=job_id)[0].worker_id
    frozen = next(p for p in chaos_stack.workers if holder.endswith(f":{p.pid}"))
    name = f"w{chaos_stack.workers.index(frozen) + 1}"
    signal_tree(frozen, signal.SIGSTOP)
    froze = time.monotonic()
    try:
        requeued = wait_until(lambda: chaos_stack.job(job_id)["attempts"] == 2, LEASE + 30, "the job to be requeued")
        wait_until(lambda: chaos_stack.job(job_id)["status"] in TERMINAL, 180, "the other worker to finish the job")
    finally:
        signal_tree(frozen, signal.SIGCONT)
    before = chaos_stack.job(job_id)
    artifacts = chaos_stack._rows("SELECT id, sha256 FROM artifacts WHERE job_id = :id ORDER BY id", id=job_id)
    wait_until(lambda: "no longer owns the job" in chaos_stack.log_text(name), 60, "the stale attempt to notice")
    # The stale attempt's Celery task has returned once the worker is idle again: it takes the next job.
    with client_of(chaos_stack) as c:
        probe = c.post("/v1/jobs", json=tiny(m, d)).json()["id"]
    wait_until(lambda: chaos_stack.statuses([probe])[probe] in TERMINAL, 120, "a job after the stale attempt")
    after = chaos_stack.job(job_id)
    assert before["status"] == after["status"] == "succeeded", after
    assert after["attempts"] == 2 and after["events"] == before["events"], (before["events"], after["events"])
    assert after["events"].count("succeeded") == 1 and after["events"].count("requeued") == 1
    assert chaos_stack._rows("SELECT id, sha256 FROM artifacts WHERE job_id = :id ORDER BY id", id=job_id) == artifacts
    assert not (chaos_stack.data_dir / "blobs" / "checkpoints" / job_id).exists() or not any(
        (chaos_stack.data_dir / "blobs" / "checkpoints" / job_id).rglob("*.pt"))
    print(f"CHAOS worker frozen (lease {LEASE} s): job requeued {requeued:.1f} s after the freeze, finished by the "
          f"other worker with attempts == 2; the woken attempt wrote nothing ({time.monotonic() - froze:.0f} s in all)")
