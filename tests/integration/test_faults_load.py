"""Chaos: many tiny jobs (JOBS, six per worker) arrive at once on two workers. Real processes on a Redis and a database of their own
(:mod:`tests.integration.chaos_stack`); the throughput is printed (``pytest -s -n0``)."""

from __future__ import annotations

import time

import pytest

from tests.integration.chaos_stack import tiny
from tests.support.chaos import TERMINAL, assert_each_ran_once, submit_many, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite

#: Six jobs per worker: each worker claims several times against the other, which is what "each once" is about;
#: more jobs would only repeat that at ~4.5 s of fixed cost each (executor start, torch import, report, plots).
JOBS = 12


def test_many_tiny_jobs_at_once_on_two_workers(chaos_stack):
    """JOBS concurrent submissions: all 202 at once, all succeed, each once; prints the throughput."""
    m, d = chaos_stack.inputs
    began = time.monotonic()
    ids = submit_many(chaos_stack.http, chaos_stack.headers, [tiny(m, d) for _ in range(JOBS)], threads=16)
    submitted = time.monotonic() - began
    took = wait_until(lambda: all(s in TERMINAL for s in chaos_stack.statuses(ids).values()), 400, f"{JOBS} jobs to end",
                      every=0.5)
    assert_each_ran_once(chaos_stack.jobs(ids))
    print(f"CHAOS {JOBS} tiny jobs on 2 workers: submitted in {submitted:.1f} s, all succeeded once "
          f"{took:.0f} s later ({JOBS / took:.2f} jobs/s)")
