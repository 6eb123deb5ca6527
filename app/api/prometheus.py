"""``GET /metrics``: one Prometheus exposition for all API processes, plus the jobs as the database has them.

**Across API processes.** ``distillery serve`` may run several uvicorn processes; a scrape reaches one of
them. Request counters therefore live in prometheus_client's multiprocess mode: each process writes its
samples to files in ``DISTILLERY_METRICS_DIR`` (default ``<data_dir>/metrics``; ``PROMETHEUS_MULTIPROC_DIR``
is set from it when this module is imported, before prometheus_client is) and a scrape sums every file.
The process that starts the server empties the directory first (:func:`app.metrics_dir.prepare`, called
by ``distillery serve``), so counters start from zero with the server; each API process marks itself dead on
exit (:func:`process_exit`), which drops its share of the in-flight gauge (``livesum``) and keeps its
counts.

**Jobs.** Jobs end in worker processes, often on other hosts, so job counts are not counted where the
transition happens: :class:`JobsCollector` reads them from the database at scrape time — jobs by status,
finished jobs by kind and status (a counter), their run time (a histogram) and the queued jobs per queue.
They are exact whichever process answers and however many hosts run workers; the cost is two aggregate
queries over ``jobs`` per scrape.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from app.metrics_dir import configure
from app.settings import get_settings

configure(get_settings())  # before prometheus_client is imported: it picks its storage at import

from prometheus_client import (  # noqa: E402 - the multiprocess directory must be set first
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily  # noqa: E402
from prometheus_client.registry import REGISTRY  # noqa: E402
from sqlalchemy import case, func, literal, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from app.db.models import Job  # noqa: E402
from app.jobs.state import QUEUED, STATUSES, TERMINAL  # noqa: E402

# Labels are methods, route templates and statuses only: never an id, a tenant or a key.
REQUESTS = Counter("distillery_http_requests", "HTTP requests served, summed over the API processes.",
                   ["method", "route", "status"])
REQUEST_SECONDS = Histogram("distillery_http_request_duration_seconds", "Time to answer an HTTP request.",
                            ["method", "route"])
IN_FLIGHT = Gauge("distillery_http_requests_in_flight", "HTTP requests being answered now (live processes).",
                  multiprocess_mode="livesum")
#: Bucket bounds of the job run-time histogram, in seconds (a minute to the default 6 h job limit and past it).
JOB_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 43200)


def multiprocess_mode() -> bool:
    """False when something imported prometheus_client before :func:`configure` (the samples then live in
    this process only, and a scrape shows this process's)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def process_exit() -> None:
    """This API process is stopping: its live gauges leave the sums, its counters stay in them."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid())


def render(session: Session) -> tuple[bytes, str]:
    """The exposition (body, content type): every API process's samples plus the jobs collector."""
    registry = CollectorRegistry()
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)
        registry.register(JobsCollector(session))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    registry.register(JobsCollector(session))
    return generate_latest(REGISTRY) + generate_latest(registry), CONTENT_TYPE_LATEST


class JobsCollector:
    """Job series read from the database at scrape time (see the module docstring)."""

    def __init__(self, session: Session):
        self.session = session

    def collect(self) -> Iterator:
        counts = self.session.execute(select(Job.status, Job.kind, Job.queue, func.count())
                                      .group_by(Job.status, Job.kind, Job.queue)).all()
        by_status = dict.fromkeys(STATUSES, 0)
        finished: dict[tuple[str, str], int] = {}
        queued: dict[str, int] = {}
        for status, kind, queue, n in counts:
            by_status[status] = by_status.get(status, 0) + n
            if status in TERMINAL:
                finished[(kind, status)] = finished.get((kind, status), 0) + n
            if status == QUEUED:
                queued[queue] = queued.get(queue, 0) + n
        jobs = GaugeMetricFamily("distillery_jobs", "Jobs in the database by status.", labels=["status"])
        for status, n in by_status.items():
            jobs.add_metric([status], n)
        yield jobs
        ended = CounterMetricFamily("distillery_jobs_finished", "Jobs that ended, by kind (step kinds joined by "
                                    "'+') and final status.", labels=["kind", "status"])
        for (kind, status), n in sorted(finished.items()):
            ended.add_metric([kind, status], n)
        yield ended
        depth = GaugeMetricFamily("distillery_queue_depth", "Jobs waiting for a worker, by queue.", labels=["queue"])
        for queue, n in sorted(queued.items()):
            depth.add_metric([queue], n)
        yield depth
        yield self._durations()

    def _durations(self) -> HistogramMetricFamily:
        seconds = _run_seconds(self.session.get_bind().dialect.name)
        buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in JOB_SECONDS_BUCKETS]
        rows = self.session.execute(
            select(Job.kind, Job.status, func.count(), func.coalesce(func.sum(seconds), literal(0.0)), *buckets)
            .where(Job.status.in_(TERMINAL), Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .group_by(Job.kind, Job.status)).all()
        hist = HistogramMetricFamily("distillery_job_duration_seconds", "Run time of ended jobs (first start to "
                                     "end), by kind and final status.", labels=["kind", "status"])
        for kind, status, count, total, *cumulative in sorted(rows, key=lambda r: (r[0], r[1])):
            points = [(str(float(b)), int(c or 0)) for b, c in zip(JOB_SECONDS_BUCKETS, cumulative)]
            hist.add_metric([kind, status], points + [("+Inf", int(count))], float(total or 0.0))
        return hist


def _run_seconds(dialect: str):
    """``finished_at - started_at`` in seconds, in the database's own arithmetic."""
    if dialect == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
