"""Operations: liveness, readiness, Prometheus metrics, capabilities."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import anyio
from anyio.lowlevel import RunVar

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy import text

from app.api.deps import DbSession, SettingsDep
from app.api.docs import problems
from app.db.session import get_engine
from app.errors import DatabaseUnavailable, ServiceUnavailable, Unauthorized
from jobspec import capabilities
from app.queue import get_celery
from app.webhooks.metrics import prometheus_lines as webhook_metrics

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


# Readiness probes run in threads of their own (never the request threads), at most a few at once: a hung
# database or broker leaves at most this many threads blocked, however often the orchestrator asks.
_PROBE_THREADS = 4
_probe_limiter: RunVar[anyio.CapacityLimiter] = RunVar("distillery_probe_threads")


def _probe_threads() -> anyio.CapacityLimiter:
    try:
        return _probe_limiter.get()
    except LookupError:
        _probe_limiter.set(limiter := anyio.CapacityLimiter(_PROBE_THREADS))
        return limiter


def _database_ok() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker_ok(url: str, timeout: float) -> None:
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
        return
    with get_celery().connection_for_write() as conn:  # the SQL transport of the embedded mode
        conn.ensure_connection(max_retries=1, timeout=timeout)


async def _probe(name: str, check: Callable[[], None], timeout: float) -> str | None:
    """None when ``check`` finished within ``timeout``; otherwise why not (a hung server is abandoned, its
    thread left to its socket timeout)."""
    try:
        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(check, limiter=_probe_threads(), abandon_on_cancel=True)
    except TimeoutError:
        return f"{name} did not answer within {timeout:g} s"
    except Exception as exc:
        return f"{name} unreachable: {type(exc).__name__}"
    return None


@router.get("/readyz", responses=problems(503))
async def readyz(settings: SettingsDep) -> dict[str, Any]:
    """The database and the broker answer, each within ``DISTILLERY_READY_TIMEOUT_SECONDS`` (probed at the same
    time, so the whole check is bounded by that): 200 ``ready``, else 503 naming what failed."""
    timeout = settings.ready_timeout_seconds
    found: dict[str, str | None] = {}

    async def run(name: str, check: Callable[[], None]) -> None:
        found[name] = await _probe(name, check, timeout)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "database", _database_ok)
        tg.start_soon(run, "broker", partial(_broker_ok, settings.resolved_broker_url, timeout))
    if found["database"]:
        raise DatabaseUnavailable(found["database"])
    if found["broker"]:
        raise ServiceUnavailable(found["broker"], code="broker_unavailable")
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
    """Prometheus text format: HTTP request series summed over every API process, and the jobs as the database
    has them (by status; finished by kind and status; run time; queue depth). See docs/operations.md#metrics."""
    from app.api import prometheus

    body, content_type = prometheus.render(db)
    body += ("\n".join(webhook_metrics(db)) + "\n").encode()
    return Response(body, media_type=content_type)


@router.get("/v1/capabilities", tags=["capabilities"])
def get_capabilities(settings: SettingsDep) -> dict[str, Any]:
    """Every step kind, loss, student family, model/dataset format and export this deployment offers, and the
    experiment trackers a job's ``tracking`` may name (``{"mlflow": true}`` when a tracking server is set)."""
    return {**capabilities(), "tracking": {"mlflow": bool(settings.mlflow_tracking_uri)}}
