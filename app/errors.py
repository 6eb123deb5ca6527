"""Typed domain errors and the one renderer that turns every error into problem details (RFC 9457).

Domain code raises these; it never speaks HTTP. Each class carries the status the API answers with,
so the mapping lives in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("distillery.api")

PROBLEM_JSON = "application/problem+json"


class DomainError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str, *, code: str | None = None, errors: list[dict] | None = None):
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code
        self.errors = errors


class Unauthorized(DomainError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class NotFound(DomainError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(DomainError):
    status, code, title = 409, "conflict", "Conflict"


class IdempotencyInFlight(Conflict):
    """Another request with the same Idempotency-Key has not finished; retrying soon replays its response."""

    code = "idempotency_in_flight"
    retry_after = 1


class PayloadTooLarge(DomainError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class Unprocessable(DomainError):
    status, code, title = 422, "invalid_request", "Unprocessable content"


class ServiceUnavailable(DomainError):
    status, code, title = 503, "unavailable", "Service unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """The database cannot serve this request now: unreachable, restarting, or every connection busy."""

    code, title = "database_unavailable", "Service unavailable"
    retry_after = 5

    def __init__(self, detail: str = "the database is unavailable; retry shortly", *, retry_after: int = 5):
        super().__init__(detail)
        self.retry_after = retry_after


#: Seconds a client is told to wait when the database is away.
DATABASE_RETRY_AFTER = 5


def _outage_types() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency; SQLite-only installs may lack it
        return OperationalError, PoolTimeout
    return OperationalError, PoolTimeout, psycopg.OperationalError


def database_unavailable(exc: BaseException | None) -> bool:
    """True for errors that mean the database cannot serve us now (refused, reset, restarting, timed out,
    pool exhausted) rather than a bug, looking through wrapped causes: these answer 503, not 500."""
    from sqlalchemy.exc import DBAPIError

    outage, seen = _outage_types(), 0
    while exc is not None and seen < 5:
        if isinstance(exc, outage) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def problem(status: int, title: str, detail: str, code: str, errors: list[dict] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://distillery.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_HTTP_CODES = {
    401: ("unauthorized", "Unauthorized"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    416: ("range_not_satisfiable", "Range not satisfiable"),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if (retry_after := getattr(exc, "retry_after", None)) is not None:
            headers["Retry-After"] = str(retry_after)
        return problem(exc.status, exc.title, exc.detail, exc.code, exc.errors, headers or None)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        prefix = ["body"] if isinstance(exc, ValidationError) else []
        errors = [{"loc": prefix + list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return problem(422, "Validation failed", f"{where}: {first['msg']}", "validation_error", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        return problem(exc.status_code, title, str(exc.detail), code, headers=getattr(exc, "headers", None))

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        """Registered for the database's own exception classes, so ExceptionMiddleware answers them and nothing
        re-raises them to the server: an outage costs one warning line per request, not a traceback."""
        if not database_unavailable(exc):
            return _internal(exc)
        log.warning("database unavailable (%s %s): %s", request.method, request.url.path, _first_line(exc))
        return problem(503, DatabaseUnavailable.title, "the database is unavailable; retry shortly",
                       DatabaseUnavailable.code, headers={"Retry-After": str(DATABASE_RETRY_AFTER)})

    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    for kind in (DBAPIError, PoolTimeout, *_outage_types()):
        app.add_exception_handler(kind, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if database_unavailable(exc):  # e.g. a domain error raised from a database error
            return await _database(request, exc)
        return _internal(exc)


def _internal(exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "Internal server error", "An unexpected error occurred; it has been logged.",
                   "internal_error")


class BudgetExceeded(Unprocessable):
    """A job whose estimated size, memory or time is over this deployment's limits (app/jobs/budget.py).

    ``exceeded`` (also rendered as the problem's ``errors``) has one entry per limit crossed:
    ``{"loc", "msg", "type": "budget_exceeded", "resource", "estimate", "limit", "setting"}``.
    """

    code, title = "budget_exceeded", "Budget exceeded"

    def __init__(self, detail: str, *, exceeded: list[dict[str, Any]] | None = None):
        super().__init__(detail, errors=exceeded or None)
        self.exceeded = exceeded or []
