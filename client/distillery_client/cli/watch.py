"""``distill jobs watch``: a live progress bar while the job runs, then the report summary as a table.

The bar shows the step (i/n and kind), the epoch, the fraction done, the server's ETA and the latest
metrics (read from the job's time series each time a new epoch is reported). On a terminal that is a
rich live display; elsewhere (logs, CI) one line per change.
"""

from __future__ import annotations

from typing import Any

from distillery_client import Client
from distillery_client.cli.output import Output, cell
from distillery_client.progress import LinePrinter, eta_text, step_text
from distillery_client.types import Job, MetricPoint

SHOWN_METRICS = 4
#: Seconds between polls of a watched job (a poll is one cached GET on the server).
POLL_SECONDS = 0.5


def latest_metrics(points: list[MetricPoint]) -> str:
    """``name=value`` of the points of the most recent (step, epoch), at most SHOWN_METRICS of them."""
    if not points:
        return ""
    last = max((p.step, p.epoch) for p in points)
    latest = [p for p in points if (p.step, p.epoch) == last][:SHOWN_METRICS]
    return "  ".join(f"{p.name}={p.value:.4g}" for p in latest)


class ProgressBar:
    """The ``progress`` callback of ``jobs.wait``: updates a rich progress bar with each new job state."""

    def __init__(self, client: Client, console: Any):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.client = client
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                            TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[metrics]}"),
                            console=console)
        self.task = self.bar.add_task("queued", total=1.0, eta="-", metrics="")
        self._epoch: tuple[Any, Any] | None = None
        self._metrics = ""

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, job: Job) -> None:
        p = job.progress
        where = (p.step_index, p.epoch) if p is not None else None
        if where is not None and where != self._epoch and p is not None and p.epoch:
            self._epoch = where
            self._metrics = latest_metrics(self.client.jobs.metrics(job.id))
        description = " · ".join(t for t in (job.status, step_text(job)) if t)
        self.bar.update(self.task, description=description, completed=(p.fraction or 0.0) if p else 0.0,
                        eta=eta_text(p.eta_seconds) if p is not None and p.eta_seconds is not None else "-",
                        metrics=self._metrics)


def wait_with_progress(client: Client, out: Output, job_id: str, timeout: float | None) -> Job:
    """``jobs.wait`` with a live display (none with --json); raises like it (JobFailed, WaitTimeout, ...)."""
    if out.as_json:
        return client.jobs.wait(job_id, timeout=timeout, poll_interval=POLL_SECONDS)
    if not out.console.is_terminal:
        return client.jobs.wait(job_id, timeout=timeout, progress=LinePrinter(out.console.file),
                                poll_interval=POLL_SECONDS)
    with ProgressBar(client, out.console) as bar:
        return client.jobs.wait(job_id, timeout=timeout, progress=bar, poll_interval=POLL_SECONDS)


def report_summary(client: Client, job: Job) -> dict[str, Any]:
    """Compression ratio and speedup, from the job's ``report`` event (no download needed)."""
    summary: dict[str, Any] = {}
    for event in client.jobs.events(job.id):
        if event.type == "report" and event.data and "compression_ratio" in event.data:
            summary = event.data
    return summary


def print_summary(client: Client, out: Output, job: Job) -> None:
    """The final report summary: teacher and student metrics side by side, compression and speedup."""
    metrics = job.metrics or {}
    teacher, student = metrics.get("teacher") or {}, metrics.get("student") or {}
    table = out.new_table(title=f"{job.id} succeeded", title_justify="left")
    for title in ("", "teacher", "student"):
        table.add_column(title, justify="right" if title else "left")
    for name in dict.fromkeys([*teacher, *student]):
        table.add_row(name, _number(teacher.get(name)), _number(student.get(name)))
    for name, value in report_summary(client, job).items():
        table.add_row(name.replace("_", " "), "", f"{value:.3g}x" if isinstance(value, (int, float)) else cell(value))
    out.console.print(table)
    out.say(f"artifacts: distill artifacts download {job.id}")


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else cell(value) if value is not None else ""
