"""OpenAPI helpers: each route declares the problem responses it can return."""

from typing import Any

from app.api.schemas import Problem

_DESCRIPTIONS = {
    401: "Missing or invalid API key",
    404: "No such resource for this tenant",
    409: "Conflicts with the resource's state, an Idempotency-Key reused with another body "
         "(`idempotency_key_reused`), or one whose first request is still in flight (`idempotency_in_flight`, "
         "with `Retry-After`)",
    413: "Body larger than its limit: DISTILLERY_MAX_UPLOAD_BYTES for uploads, DISTILLERY_MAX_JSON_BODY_BYTES "
         "for JSON",
    416: "Range not satisfiable",
    422: "Invalid input (problem details, with `errors` for field validation)",
    503: "A dependency (database, broker, object store) is unreachable",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": Problem, "description": _DESCRIPTIONS[c],
                "content": {"application/problem+json": {}}} for c in codes}
