"""The report's side work, off the job's critical path: file hashes, the teacher's gzip size, the plots.

:class:`SideWork` runs them on two daemon threads while the main thread exports and verifies the
student (and writes the card): hashing and gzip run in C with the GIL released (``hashlib``, ``zlib``),
so on a second core they cost the job no wall time; the plots hold the GIL while matplotlib draws,
and overlap the exports' file writes, ONNX Runtime sessions and torch kernels. The job starts the side
work once nothing is timed any more (after the last latency measurement), so it cannot disturb a
measurement - or, for the GIL-free part, at the job's start when torch leaves a core free
(:meth:`SideWork.spare_core`). :meth:`SideWork.result` waits for a piece (``background_wait`` in the job's timings) and
re-raises its error; each piece's own seconds are recorded under its phase (``hashes``, ``plots``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from engine.report.timings import JobTimings

#: Teachers at or above this size get no gzip size (compressing them would cost seconds).
GZIP_LIMIT_BYTES = 256 << 20


def teacher_gzip_size(path: Path) -> int | None:
    """gzip (level 6) size of the teacher's file; None for a directory, a missing file or one of
    :data:`GZIP_LIMIT_BYTES` or more."""
    from engine.report.measure import gzip_size

    path = Path(path)
    if not path.is_file() or path.stat().st_size >= GZIP_LIMIT_BYTES:
        return None
    return gzip_size(path.read_bytes())


class SideWork:
    """Named pieces of report work on background threads; :meth:`close` always (it joins them)."""

    def __init__(self, timings: JobTimings | None) -> None:
        self.timings = timings
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="distillery-report")
        self._futures: dict[str, Future] = {}

    def submit(self, key: str, phase: str, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` as piece ``key`` (once: a key already started is left alone)."""
        if key in self._futures:
            return

        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if self.timings is not None:
                    self.timings.add(phase, time.perf_counter() - started)

        self._futures[key] = self._pool.submit(timed)

    def started(self, key: str) -> bool:
        return key in self._futures

    def result(self, key: str, default: Callable[[], Any] | None = None) -> Any:
        """Piece ``key``'s value (waiting for it); ``default()`` computes it here when it was never started."""
        future = self._futures.get(key)
        if future is None:
            if default is None:
                raise KeyError(key)
            return default()
        if not future.done():
            with self.timings.phase("background_wait") if self.timings is not None else nullcontext():
                wait([future])
        return future.result()

    @staticmethod
    def spare_core(threads: int) -> bool:
        """Whether this process may use more cores than torch's ``threads``: GIL-free side work can then
        run from the job's start without taking a core from training or a latency measurement."""
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return cores > threads

    def start_files(self, teacher_path: Path, hashes: Mapping[str, Path]) -> None:
        """The teacher's gzip size (``"teacher_gzip"``) and the sha256 of each file in ``hashes``
        (``"sha256:<path>"``) - GIL-free work."""
        from engine.report.rows import file_sha256

        self.submit("teacher_gzip", "hashes", teacher_gzip_size, Path(teacher_path))
        for path in dict.fromkeys(Path(p) for p in hashes.values()):
            self.submit(f"sha256:{path}", "hashes", file_sha256, path)

    def sha256(self, path: Path, known: str = "") -> str:
        """``known`` when the source came with its hash, else the file's sha256 (started or computed here)."""
        if known:
            return known
        from engine.report.rows import file_sha256

        return self.result(f"sha256:{Path(path)}", lambda: file_sha256(Path(path)))

    def start_plots(self, history: Sequence[Mapping[str, Any]], teacher: Mapping[str, Any],
                    rows: Sequence[Mapping[str, Any]], out_dir: Path, task: str) -> None:
        """``card.write_plots`` on copies of the rows (the main thread goes on adding to them)."""
        from engine.report import card

        snapshot = ([dict(h) for h in history], dict(teacher), [dict(r) for r in rows])
        self.submit("plots", "plots", lambda: card.write_plots(*snapshot, out_dir, task))

    def close(self) -> None:
        """Wait for every piece and stop the threads (pieces not started yet are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
