"""Operations: liveness, readiness, Prometheus metrics, capabilities."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text

from app.api.deps import DbSession, SettingsDep
from app.api.docs import problems
from app.db.models import Job
from app.errors import ServiceUnavailable, Unauthorized
from app.jobs.spec import capabilities
from app.jobs.state import STATUSES
from app.queue import get_celery

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses=problems(503))
def readyz(db: DbSession) -> dict[str, Any]:
    """The database and the broker are reachable."""
    try:
        db.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"database unreachable: {exc.__class__.__name__}", code="database_unavailable") from exc
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        raise ServiceUnavailable(f"broker unreachable: {exc.__class__.__name__}", code="broker_unavailable") from exc
    return {"status": "ready", "database": "ok", "broker": "ok"}


def _metrics_auth(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """With ``DISTILLERY_METRICS_TOKEN`` set, only a scraper holding it may read /metrics (compared in
    constant time). The series never carry tenant or job ids either way: labels are statuses and route
    templates only."""
    if not settings.metrics_token:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.metrics_token.encode()):
        raise Unauthorized("/metrics requires 'Authorization: Bearer <metrics token>' (DISTILLERY_METRICS_TOKEN)")


@router.get("/metrics", response_class=PlainTextResponse, responses=problems(401),
            dependencies=[Depends(_metrics_auth)])
def metrics(db: DbSession) -> Response:
    """Prometheus text format: jobs by status, plus this process's HTTP request counters."""
    from app.api.telemetry import REQUESTS

    counts = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines = ["# HELP distillery_jobs Jobs in the database by status.", "# TYPE distillery_jobs gauge"]
    lines += [f'distillery_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in STATUSES]
    lines += ["# HELP distillery_http_requests_total HTTP requests served by this process.",
              "# TYPE distillery_http_requests_total counter"]
    lines += [f'distillery_http_requests_total{{method="{m}",route="{r}",status="{c}"}} {n}'
              for (m, r, c), n in sorted(REQUESTS.items())]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


@router.get("/v1/capabilities", tags=["capabilities"])
def get_capabilities() -> dict[str, Any]:
    """Every step kind, loss, student family, model/dataset format and export this deployment offers."""
    return capabilities()
