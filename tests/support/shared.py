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
    with built_once_in(shared_root(tmp_path_factory), name) as (directory, build):
        yield directory, build


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's temporary directory every process of it shares (above each xdist worker's own)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@contextmanager
def built_once_in(root: Path, name: str) -> Iterator[tuple[Path, bool]]:
    """:func:`built_once` under ``root`` (for a helper process that has no pytest of its own)."""
    directory = root / f"shared-{name}"
    directory.mkdir(exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = directory / ".built"
        yield directory, not done.exists()
        done.touch()
