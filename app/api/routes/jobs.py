"""/v1/jobs — create, watch, cancel distillation jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    CurrentPrincipal, Cursor, DbSession, IdempotencyKey, JsonObject, SessionlessPrincipal, SettingsDep,
)
from app.api.docs import problems
from app.api.job_cache import get_cache
from app.api.schemas import (
    ArtifactsOut, EventsOut, JobOut, MetricsOut, Page, artifact_out, event_out, job_out, metric_out,
)
from app.db.models import Job
from app.db.session import get_sessionmaker, request_session
from app.jobs import service
from jobspec import JobSpec
from app.jobs.state import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_SEQ = 2**62  # event seqs are 64-bit at most; a larger 'after' is a client error, not a database one
POLL_SECONDS = 0.5

_SPEC_EXAMPLE = JobSpec.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=problems(401, 404, 409, 413, 422),
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/JobSpec"}, "example": _SPEC_EXAMPLE}}}})
def create_job(response: Response, principal: CurrentPrincipal, db: DbSession, settings: SettingsDep,
               idempotency_key: IdempotencyKey, body: JsonObject) -> JobOut:
    """Validate and queue a job. 202 with the job; it runs on a worker. Ids must belong to the caller's tenant.

    The body (a JobSpec) is read raw: parsed with a depth bound, so no client can make the parser recurse.
    """
    job, created = service.create_job(db, settings, principal.tenant_id, body, idempotency_key)
    db.commit()  # the message to the worker is sent by the after-commit hook
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


@router.get("", response_model=Page[JobOut], responses=problems(401, 422))
def list_jobs(principal: CurrentPrincipal, db: DbSession, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Cursor = None, status: Annotated[str | None, Query(max_length=32)] = None,
              kind: Annotated[str | None, Query(max_length=200)] = None,
              parent_id: Annotated[str | None, Query(max_length=40, description="A search job: list its trials "
                                                                                 "(trials are listed only so).")] = None,
              ) -> Page[JobOut]:
    rows, has_more, cursor = service.list_jobs(db, principal.tenant_id, limit=limit, after=after, status=status,
                                               kind=kind, parent_id=parent_id)
    return Page[JobOut](data=[job_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/{job_id}/trials", response_model=Page[JobOut], responses=problems(401, 404, 422))
def job_trials(job_id: str, principal: CurrentPrincipal, db: DbSession,
               limit: Annotated[int, Query(ge=1, le=100)] = 100, after: Cursor = None) -> Page[JobOut]:
    """The trials of a search job (child jobs, newest first); same as ``GET /v1/jobs?parent_id=``."""
    service.get_job(db, principal.tenant_id, job_id)
    rows, has_more, cursor = service.list_jobs(db, principal.tenant_id, limit=limit, after=after, status=None,
                                               kind=None, parent_id=job_id)
    return Page[JobOut](data=[job_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


def _render_job(db: Session, tenant_id: str, job_id: str) -> bytes:
    return job_out(service.get_job(db, tenant_id, job_id)).model_dump_json().encode()


@router.get("/{job_id}", response_model=JobOut, responses=problems(401, 404))
async def get_job(job_id: str, principal: SessionlessPrincipal) -> Response:
    """The job. Answered from this process's job cache while the row is unchanged (app/api/job_cache.py):
    a poll costs no query and no thread; otherwise one read in a thread."""
    cache = get_cache()
    if (body := cache.get(principal.tenant_id, job_id)) is None:
        epoch = cache.epoch
        async with request_session() as db:
            body = await anyio.to_thread.run_sync(_render_job, db, principal.tenant_id, job_id)
        cache.put(epoch, principal.tenant_id, job_id, body)
    return Response(body, media_type="application/json")


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=problems(401, 404, 409))
def cancel_job(job_id: str, principal: CurrentPrincipal, db: DbSession) -> JobOut:
    """Ask the job to stop. Idempotent; a finished job answers 409."""
    job = service.cancel_job(db, principal.tenant_id, job_id)
    db.commit()
    get_cache().invalidate(job_id)  # this client's next read sees it even before the notification arrives
    return job_out(job)


def _poll(job_id: str, after: int) -> tuple[list, bool]:
    """One short session per poll: the connection goes back to the pool before the follower waits."""
    with get_sessionmaker()() as db:
        events = service.events_after(db, job_id, after)
        job = db.get(Job, job_id)
        return events, job is None or job.status in TERMINAL


async def _follow(job_id: str, after: int) -> AsyncIterator[str]:
    """Server-sent events: poll the table, emit new events, stop once the job is terminal.

    Async, so a waiting follower holds neither a worker thread nor a database connection: many
    followers must not starve the pool the rest of the API needs.
    """
    last = after
    while True:
        events, done = await run_in_threadpool(_poll, job_id, last)
        for e in events:
            last = e.seq
            yield f"id: {e.seq}\nevent: {e.type}\ndata: {json.dumps(event_out(e).model_dump())}\n\n"
        if done and not events:
            yield "event: end\ndata: {}\n\n"
            return
        if not events:
            yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_SECONDS)


@router.get("/{job_id}/events", response_model=EventsOut, responses=problems(401, 404),
            description="JSON page of events after `after` (a seq). With `Accept: text/event-stream` it follows "
                        "live until the job ends.")
def job_events(job_id: str, request: Request, principal: CurrentPrincipal, db: DbSession,
               after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 1000) -> Any:
    service.get_job(db, principal.tenant_id, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        # The request's session would otherwise stay checked out, idle in transaction, until the stream
        # ends (yield dependencies exit after the response); the follower polls with its own short ones.
        db.close()
        return StreamingResponse(_follow(job_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return EventsOut(data=[event_out(e) for e in service.events_after(db, job_id, after, limit)])


@router.get("/{job_id}/metrics", response_model=MetricsOut, responses=problems(401, 404))
def job_metrics(job_id: str, principal: CurrentPrincipal, db: DbSession) -> MetricsOut:
    service.get_job(db, principal.tenant_id, job_id)
    return MetricsOut(data=[metric_out(m) for m in service.metric_points(db, job_id)])


@router.get("/{job_id}/artifacts", response_model=ArtifactsOut, responses=problems(401, 404))
def job_artifacts(job_id: str, principal: CurrentPrincipal, db: DbSession) -> ArtifactsOut:
    service.get_job(db, principal.tenant_id, job_id)
    return ArtifactsOut(data=[artifact_out(a) for a in service.job_artifacts(db, job_id)])
