"""Chaos: 100 tiny jobs arrive at once on two workers. Real processes on a Redis and a database of their own
(:mod:`tests.integration.chaos_stack`); the throughput is printed (``pytest -s``)."""

from __future__ import annotations

import time

import pytest

from tests.integration.chaos_stack import tiny
from tests.support.chaos import TERMINAL, assert_each_ran_once, submit_many, wait_until

pytestmark = pytest.mark.integration


def test_a_hundred_tiny_jobs_on_two_workers(chaos_stack):
    """100 concurrent submissions: all 202 at once, all succeed, each once; prints the throughput."""
    m, d = chaos_stack.inputs
    began = time.monotonic()
    ids = submit_many(chaos_stack.http, chaos_stack.headers, [tiny(m, d) for _ in range(100)], threads=16)
    submitted = time.monotonic() - began
    took = wait_until(lambda: all(s in TERMINAL for s in chaos_stack.statuses(ids).values()), 400, "100 jobs to end",
                      every=0.5)
    assert_each_ran_once(chaos_stack.jobs(ids))
    print(f"CHAOS 100 tiny jobs on 2 workers: submitted in {submitted:.1f} s, all succeeded once "
          f"{took:.0f} s later ({100 / took:.2f} jobs/s)")
