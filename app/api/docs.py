"""OpenAPI helpers: each route declares the problem responses it can return."""

from typing import Any

from app.api.schemas import Problem

_DESCRIPTIONS = {
    401: "Missing or invalid API key",
    404: "No such resource for this tenant",
    409: "Conflicts with the resource's state, or an Idempotency-Key reused with another body",
    413: "Upload larger than DISTILLERY_MAX_UPLOAD_BYTES",
    416: "Range not satisfiable",
    422: "Invalid input (problem details, with `errors` for field validation)",
    503: "A dependency (database, broker) is unreachable",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": Problem, "description": _DESCRIPTIONS[c],
                "content": {"application/problem+json": {}}} for c in codes}
