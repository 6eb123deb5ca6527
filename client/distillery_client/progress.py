"""A job's progress as one line of text, and the printer ``jobs.wait(progress=True)`` uses."""

from __future__ import annotations

import sys
from typing import TextIO

from distillery_client.types import Job


def step_text(job: Job) -> str:
    """``step 1/2 distill · epoch 3/20`` (empty before the first step starts)."""
    p = job.progress
    if p is None or p.step_index is None:
        return ""
    steps = job.spec.get("steps") if isinstance(job.spec, dict) else None
    of = f"/{len(steps)}" if isinstance(steps, list) and steps else ""
    text = f"step {p.step_index + 1}{of} {p.step_kind or ''}".rstrip()
    if p.epochs:
        text += f" · epoch {p.epoch or 0}/{p.epochs}"
    return text


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def describe(job: Job) -> str:
    """``job_… running · step 1/2 distill · epoch 3/20 · 45% · ETA 12s``."""
    parts = [f"{job.id} {job.status}"]
    if (step := step_text(job)) and not job.done:
        parts.append(step)
    p = job.progress
    if p is not None and p.fraction is not None:
        parts.append(f"{p.fraction:.0%}")
    if p is not None and not job.done and (eta := eta_text(p.eta_seconds)):
        parts.append(f"ETA {eta}")
    if job.error is not None:
        parts.append(f"{job.error.code}: {job.error.message}")
    return " · ".join(parts)


class LinePrinter:
    """Prints :func:`describe` of each new state: rewriting one line on a terminal, a line each otherwise."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def __call__(self, job: Job) -> None:
        line = describe(job)
        if self._tty:
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if job.done else ""))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
