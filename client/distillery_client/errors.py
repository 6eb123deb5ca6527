"""Typed errors. Every error response of the API is a problem-details body
(``{"type", "title", "status", "detail", "code", "errors"}``); :func:`error_from_response` turns it into the
:class:`APIError` subclass for its status, carrying those fields.

::

    DistilleryError
    ├── APIError (status, code, detail, title, type, errors)
    │   ├── AuthenticationError      401
    │   ├── PermissionDeniedError    403
    │   ├── NotFoundError            404
    │   ├── ConflictError            409
    │   ├── PayloadTooLargeError     413
    │   ├── ValidationError          422 (field errors in ``errors``)
    │   ├── RateLimitError           429
    │   └── ServerError              5xx
    ├── APIConnectionError           the server could not be reached (after the retries)
    │   └── APITimeoutError
    ├── JobFailed (job, code, message)
    │   └── JobCancelled
    ├── WaitTimeout                  jobs.wait(timeout=...) ran out (also a TimeoutError)
    └── ChecksumMismatch             a download's sha256 differs from the artifact's
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from distillery_client.types import Job


class DistilleryError(Exception):
    """Base of every error this package raises."""


@dataclass(frozen=True)
class FieldError:
    """One entry of a 422's ``errors``: where (``loc``, e.g. ``("body", "steps", 0, "epochs")``) and what."""

    loc: tuple[Any, ...]
    msg: str
    type: str | None = None

    @property
    def field(self) -> str:
        """``loc`` as a dotted path (``body.steps.0.epochs``)."""
        return ".".join(str(p) for p in self.loc)


class APIError(DistilleryError):
    """The server answered with an error status. ``detail`` is its human sentence, ``code`` the machine code."""

    def __init__(self, status: int, detail: str, *, code: str | None = None, title: str | None = None,
                 type: str | None = None, errors: list[FieldError] | None = None, retry_after: float | None = None,
                 body: Any = None):
        super().__init__(detail)
        self.status, self.detail, self.code, self.title, self.type = status, detail, code, title, type
        self.errors = errors or []
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        where = f" ({self.code}, HTTP {self.status})" if self.code else f" (HTTP {self.status})"
        return f"{self.detail}{where}"


class AuthenticationError(APIError):
    """401: no API key, or one the server does not know (or has revoked)."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: no such resource in your tenant (another tenant's id answers exactly the same)."""


class ConflictError(APIError):
    """409: e.g. cancelling a finished job, deleting a model a job uses, an Idempotency-Key reused."""


class PayloadTooLargeError(APIError):
    """413: the upload or body is over the server's limit."""


class ValidationError(APIError):
    """422: the request was understood but refused; ``errors`` names the offending fields."""

    def __str__(self) -> str:
        text = super().__str__()
        fields = "; ".join(f"{e.field}: {e.msg}" for e in self.errors[:5] if e.loc)
        return f"{text} [{fields}]" if fields and len(self.errors) > 1 else text


class RateLimitError(APIError):
    """429: too many requests; ``retry_after`` says when to come back."""


class ServerError(APIError):
    """5xx: the server failed (503 ``database_unavailable`` / ``broker_unavailable`` are transient)."""


class APIConnectionError(DistilleryError):
    """The request did not get an answer: connection refused or reset, DNS, TLS, a dropped stream."""

    def __init__(self, message: str, *, request: httpx.Request | None = None):
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class JobFailed(DistilleryError):
    """The job ended ``failed`` (or, as :class:`JobCancelled`, ``cancelled``). ``code`` and ``message`` are the
    job's ``error`` (see the server's docs/errors.md); ``job`` is the final job object."""

    def __init__(self, job: Job):
        error = job.error
        self.job = job
        self.code = error.code if error else job.status
        self.message = error.message if error and error.message else f"job {job.id} ended {job.status}"
        super().__init__(f"job {job.id} {job.status}: {self.message} ({self.code})")


class JobCancelled(JobFailed):
    """The job ended ``cancelled``."""


class WaitTimeout(DistilleryError, TimeoutError):
    """``jobs.wait`` gave up; the job goes on running on the server. ``job`` is the last state seen."""

    def __init__(self, job: Job, timeout: float):
        self.job, self.timeout = job, timeout
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")


class ChecksumMismatch(DistilleryError):
    """The downloaded bytes do not hash to the artifact's sha256 (the partial file is removed)."""

    def __init__(self, artifact_id: str, expected: str, actual: str):
        self.artifact_id, self.expected, self.actual = artifact_id, expected, actual
        super().__init__(f"artifact {artifact_id}: downloaded sha256 {actual} but the server lists {expected}")


_BY_STATUS: dict[int, type[APIError]] = {401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
                                         409: ConflictError, 413: PayloadTooLargeError, 422: ValidationError,
                                         429: RateLimitError}


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from now; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error response (its body already read)."""
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        pass
    if not isinstance(body, dict):
        text = response.text.strip()[:300] if response.content else ""
        body = {"detail": text or response.reason_phrase or f"HTTP {response.status_code}"}
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    raw_errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    errors = [FieldError(loc=tuple(e.get("loc") or ()), msg=str(e.get("msg", "")), type=e.get("type"))
              for e in raw_errors if isinstance(e, dict)]
    detail = body.get("detail")
    if not isinstance(detail, str) or not detail:
        detail = str(body.get("title") or response.reason_phrase or f"HTTP {status}")
    return cls(status, detail, code=body.get("code"), title=body.get("title"), type=body.get("type"), errors=errors,
               retry_after=retry_after_seconds(response.headers.get("retry-after")), body=body)
