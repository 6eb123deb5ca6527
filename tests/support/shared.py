"""Build something once per test run, however many processes the run has (pytest-xdist workers).

Deterministic fixtures — a seeded teacher trained on digits — come out the same in every process, so the
first process to need one builds it into a directory all workers share, under a lock, and the others load it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """``with built_once(factory, "teachers") as (directory, build):`` — build into ``directory`` when ``build``
    is true. Exclusive while the block runs; a block that raised leaves it for the next process to build."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above every worker's own
    directory = root / f"shared-{name}"
    directory.mkdir(exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = directory / ".built"
        yield directory, not done.exists()
        done.touch()
