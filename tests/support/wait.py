"""Waiting on a condition with a deadline — never a fixed sleep standing in for synchronisation."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``predicate`` every ``every`` seconds until it returns something truthy; returns the seconds it took.
    Fails with ``what`` after ``timeout`` seconds (an exception raised by ``predicate`` propagates)."""
    began = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
