"""/v1/artifacts — metadata and streamed downloads with ``ETag`` (the sha256) and ``Range``."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.api.deps import CurrentPrincipal, DbSession, SettingsDep, StorageDep
from app.api.docs import problems
from app.api.schemas import ArtifactOut, artifact_out
from app.errors import DomainError
from app.jobs import service

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])
# At most 18 digits: larger offsets exceed any artifact, and int() of a huge digit string is slow or refused.
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")


class RangeNotSatisfiable(DomainError):
    status, code, title = 416, "range_not_satisfiable", "Range not satisfiable"


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single ``bytes=`` range; None to serve the whole file."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: RFC 9110 lets us ignore it and send 200
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size or start > end:
        raise RangeNotSatisfiable(f"range {header!r} is outside the {size}-byte artifact")
    return start, end


@router.get("/{artifact_id}", response_model=ArtifactOut, responses=problems(401, 404))
def get_artifact(artifact_id: str, principal: CurrentPrincipal, db: DbSession) -> ArtifactOut:
    return artifact_out(service.get_artifact(db, principal.tenant_id, artifact_id))


@router.get("/{artifact_id}/content", response_class=StreamingResponse, responses={
    200: {"content": {"application/octet-stream": {}}, "description": "The whole artifact"},
    206: {"description": "The requested byte range"}, 304: {"description": "Not modified (If-None-Match)"},
    307: {"description": "With DISTILLERY_S3_PRESIGNED_DOWNLOADS: a short-lived presigned URL of the object "
                         "store that serves the bytes (Range supported there too)"},
    **problems(401, 404, 416)})
def artifact_content(artifact_id: str, request: Request, principal: CurrentPrincipal, db: DbSession,
                     storage: StorageDep, settings: SettingsDep) -> Response:
    art = service.get_artifact(db, principal.tenant_id, artifact_id)  # the key and tenant are checked first
    etag = f'"{art.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{art.filename}"'}
    if request.headers.get("if-none-match") in (etag, art.sha256):
        return Response(status_code=304, headers=headers)
    if settings.s3_presigned_downloads and (url := storage.presigned_url(
            art.storage_key, expires_seconds=settings.s3_presigned_seconds, filename=art.filename,
            media_type=art.media_type)):
        # 307 keeps the method; the client sends its Range header to the store, which answers it itself.
        return RedirectResponse(url, status_code=307, headers={"ETag": etag, "Cache-Control": "no-store"})
    size = art.size_bytes
    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    span = _parse_range(rng, size) if rng and (if_range is None or if_range == etag) else None
    db.close()  # the stream may take minutes; it needs the blob, not a pooled connection held idle meanwhile
    if span is None:
        return StreamingResponse(storage.read_range(art.storage_key, 0, size), media_type=art.media_type,
                                 headers={**headers, "Content-Length": str(size)})
    start, end = span
    return StreamingResponse(storage.read_range(art.storage_key, start, end - start + 1), status_code=206,
                             media_type=art.media_type,
                             headers={**headers, "Content-Range": f"bytes {start}-{end}/{size}",
                                      "Content-Length": str(end - start + 1)})
