"""/v1/datasets — transfer data: an upload (multipart) or a reference (JSON with a ``uri``)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import (CurrentPrincipal, Cursor, DbSession, IdempotencyKey, SettingsDep, StorageDep,
                          SessionlessPrincipal)
from app.api.deps import committed as _committed
from app.api.docs import problems
from app.api.schemas import DatasetOut, Page, dataset_out
from app.api.uploads import check_form, parse_json
from app.catalog import service
from app.catalog.dataset_files import SUPPORTED_DATASET_FORMATS, DatasetOptions
from app.catalog import remote
from app.catalog.uploads import Received, receive, temp_file
from app.db.models import Dataset
from app.db.session import request_session
from app.errors import Unprocessable
from app.pagination import paginate
from app.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
FIELDS = {"file", "name", "format", "inputs", "label_column", "options"}
# Longest accepted value of each multipart text field (those not listed: uploads.DEFAULT_FIELD_LENGTH).
FIELD_LENGTHS = {"inputs": 4096, "options": 4096}


class DatasetByUri(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    uri: str = Field(min_length=1, max_length=2000, examples=["file:///data/digits.npz"],
                     description="file:// (under DISTILLERY_ALLOWED_FILE_ROOTS), s3://bucket/key (bucket in "
                                 "DISTILLERY_ALLOWED_S3_BUCKETS) or https://host/path (host in "
                                 "DISTILLERY_ALLOWED_HTTP_HOSTS). Fetched now, then inspected like an upload.")
    format: Literal["npz", "pt", "csv", "parquet", "image_folder"] = "npz"
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="When given, the fetched bytes must "
                                                                            "have this sha256 (hex), else 422.")
    inputs: list[str] | None = Field(None, max_length=16, description="Arrays fed to the model; default ['x'].")
    label_column: str | None = Field(None, max_length=200, description="csv/parquet: the label column.")
    options: DatasetOptions | None = None


_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file", "name", "format"],
                "properties": {"file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
                               "format": {"type": "string", "enum": list(SUPPORTED_DATASET_FORMATS)},
                               "inputs": {"type": "string", "description": "JSON list of input array names"},
                               "label_column": {"type": "string", "description": "csv/parquet label column"},
                               "options": {"type": "string", "description": "JSON DatasetOptions (image_size, "
                                                                            "grayscale, normalize)"}}}},
            "application/json": {"schema": {"$ref": "#/components/schemas/DatasetByUri"}},
        },
    }
}


def _file_path(parsed_path: str) -> Path:
    """The local path a file:// URI names. A NUL byte (``%00``) can name no file; an unresolvable path is 422."""
    raw = unquote(parsed_path)
    if "\x00" in raw:
        raise Unprocessable("the uri contains a NUL byte (%00); no file can be named by it", code="invalid_uri",
                            errors=[{"loc": ["body", "uri"], "msg": "NUL bytes are not allowed"}])
    try:
        return Path(raw).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise Unprocessable(f"the uri's path cannot be resolved: {exc}", code="invalid_uri") from exc


def _resolve_file_uri(uri: str, settings: Settings) -> Path:
    try:
        parsed = urlparse(uri)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise Unprocessable(f"the uri is malformed: {exc}", code="invalid_uri") from exc
    if parsed.scheme != "file":
        raise Unprocessable("uri must be file://, s3:// or https://", code="invalid_uri")
    path = _file_path(parsed.path)
    roots = [r.resolve() for r in settings.allowed_file_roots]
    if not any(path == r or r in path.parents for r in roots):
        raise Unprocessable(f"{path} is outside the allowed roots (DISTILLERY_ALLOWED_FILE_ROOTS: "
                            f"{', '.join(map(str, roots)) or 'none configured'})", code="uri_not_allowed")
    try:
        is_file = path.is_file()
    except OSError:  # a component too long, a permission denied: no file we may read either way
        is_file = False
    if not is_file:
        raise Unprocessable(f"{path} does not exist or is not a file", code="uri_not_found")
    return path


def _open_uri_file(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:  # removed or made unreadable since it was checked
        raise Unprocessable(f"{path} cannot be read: {exc.strerror}", code="uri_not_found") from exc


def _json_field(raw: str | None, field: str, max_depth: int) -> dict | None:
    if not raw:
        return None
    try:
        value = parse_json(raw, max_depth, f"'{field}'", ["body", field])
    except Unprocessable as exc:
        if exc.code == "invalid_json":
            exc.code = "validation_error"  # a bad form field is a validation error, as it always was
        raise
    if not isinstance(value, dict):
        raise Unprocessable(f"'{field}' must be a JSON object", code="validation_error")
    return value


def _options(raw: dict | None, label_column: str | None) -> DatasetOptions:
    merged = dict(raw or {})
    if label_column is not None:
        merged["label_column"] = label_column
    return DatasetOptions.model_validate(merged)


def _inputs_field(raw: str | None, max_depth: int) -> list[str] | None:
    if not raw:
        return None
    try:
        value = (parse_json(raw, max_depth, "'inputs'", ["body", "inputs"]) if raw.strip().startswith("[")
                 else [s.strip() for s in raw.split(",") if s.strip()])
    except Unprocessable as exc:
        raise Unprocessable(f"'inputs' must be a JSON list of array names: {exc.detail}",
                            code="validation_error") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Unprocessable("'inputs' must be a list of array names", code="validation_error")
    return value


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses=problems(401, 409, 413, 422), openapi_extra=_UPLOAD_DOC)
async def create_dataset(request: Request, response: Response, principal: SessionlessPrincipal, storage: StorageDep,
                         settings: SettingsDep, idempotency_key: IdempotencyKey) -> DatasetOut:
    """Register a dataset: ``multipart/form-data`` with ``file``, ``name``, ``format``, or JSON with a ``uri``."""
    ctype = request.headers.get("content-type", "")
    tmp_dir = settings.data_dir / "tmp"
    async with AsyncExitStack() as stack:
        if ctype.startswith("application/json"):
            body = DatasetByUri.model_validate(parse_json(await request.body(), settings.max_json_depth))
            options = _options(body.options.model_dump() if body.options else None, body.label_column)
            name, fmt, inputs = body.name, body.format, body.inputs
            received = await _by_uri(body, settings, tmp_dir, stack)
        else:
            name, fmt, inputs, options, received = await _upload(request, settings, tmp_dir, stack)
        async with request_session() as db:  # only now that the bytes are on disk
            row, created = await run_in_threadpool(
                _committed, service.create_dataset, db, storage, settings, principal.tenant_id, upload=received,
                name=str(name), format=str(fmt), inputs=inputs, options=options, idempotency_key=idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return dataset_out(row)


async def _by_uri(body: DatasetByUri, settings: Settings, tmp_dir: Path, stack: AsyncExitStack) -> Received:
    """The file ``body.uri`` names, copied (file://) or fetched (s3://, https://) into a temp file."""
    if remote.is_remote(body.uri):
        source = remote.parse(body.uri, settings)  # the allow-lists, before any connection
        path = stack.enter_context(temp_file(tmp_dir))
        received = await run_in_threadpool(remote.fetch, source, path, settings)
    else:
        src = _open_uri_file(_resolve_file_uri(body.uri, settings))
        stack.callback(src.close)
        received = stack.enter_context(receive(src, tmp_dir, settings.max_upload_bytes))
    if body.sha256 is not None and received.sha256 != body.sha256:
        raise Unprocessable(f"{body.uri} has sha256 {received.sha256}, not the {body.sha256} the request names",
                            code="sha256_mismatch", errors=[{"loc": ["body", "sha256"], "msg": "does not match"}])
    return received


async def _upload(request: Request, settings: Settings, tmp_dir: Path, stack: AsyncExitStack):
    """(name, format, inputs, options, received) of a multipart upload."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        await check_form(request, FIELDS, FIELD_LENGTHS)
        form = await request.form()
        upload, name, fmt = form.get("file"), form.get("name"), form.get("format")
        missing = [k for k, v in (("file", upload), ("name", name), ("format", fmt)) if not v]
        if missing or isinstance(upload, str):
            raise Unprocessable(f"missing form field(s): {', '.join(missing) or 'file'}", code="validation_error",
                                errors=[{"loc": ["body", k], "msg": "Field required"} for k in missing or ["file"]])
        if not isinstance(name, str) or not isinstance(fmt, str):
            raise Unprocessable("'name' and 'format' must be text fields, not files", code="validation_error")
        inputs, src = _inputs_field(form.get("inputs"), settings.max_json_depth), upload.file  # type: ignore
        stack.callback(src.close)
        options = _options(_json_field(form.get("options"), "options", settings.max_json_depth),
                           form.get("label_column") or None)
        return name, fmt, inputs, options, stack.enter_context(receive(src, tmp_dir, settings.max_upload_bytes))
    raise Unprocessable("send multipart/form-data (file upload) or application/json (uri)",
                        code="unsupported_media_type")


@router.get("", response_model=Page[DatasetOut], responses=problems(401, 422))
def list_datasets(principal: CurrentPrincipal, db: DbSession, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  after: Cursor = None) -> Page[DatasetOut]:
    rows, has_more, cursor = paginate(db, select(Dataset).where(Dataset.tenant_id == principal.tenant_id), Dataset,
                                      limit, after)
    return Page[DatasetOut](data=[dataset_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=problems(401, 404))
def get_dataset(dataset_id: str, principal: CurrentPrincipal, db: DbSession) -> DatasetOut:
    return dataset_out(service.get_dataset(db, principal.tenant_id, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(401, 404, 409))
def delete_dataset(dataset_id: str, principal: CurrentPrincipal, db: DbSession, storage: StorageDep) -> Response:
    key = service.delete_dataset(db, principal.tenant_id, dataset_id)
    db.commit()
    storage.delete(key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
