"""/v1/models — teacher (and student) checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import (CurrentPrincipal, Cursor, DbSession, IdempotencyKey, SettingsDep, StorageDep,
                          SessionlessPrincipal)
from app.api.deps import committed as _committed
from app.db.session import request_session
from app.api.docs import problems
from app.api.schemas import ModelOut, Page, model_out
from app.api.uploads import check_form, parse_json
from app.catalog import service
from app.catalog.uploads import receive
from app.db.models import Model
from app.errors import Unprocessable
from app.pagination import paginate

router = APIRouter(prefix="/v1/models", tags=["models"])
FIELDS = {"file", "name", "format", "task", "architecture"}
# Longest accepted value of each text field (those not listed: uploads.DEFAULT_FIELD_LENGTH).
FIELD_LENGTHS = {"architecture": 65536}


def _check_architecture(raw: str, max_depth: int) -> None:
    """The catalog parses ``architecture`` itself; bound its depth and check its strings first, so that
    parse can neither recurse without limit nor hand the database a NUL byte."""
    try:
        parse_json(raw, max_depth, "'architecture'", ["body", "architecture"])
    except Unprocessable as exc:
        exc.code = "invalid_architecture" if exc.code == "invalid_json" else exc.code
        raise


class ModelForm(BaseModel):
    """The text fields of the upload form, validated once the caller is known (see create_model)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    format: str | None = Field(None, description="torchscript | onnx | torch_export | safetensors; "
                                                 "detected from content when absent")
    task: str = "classification"
    architecture: str | None = Field(None, description="JSON: a built-in family and its arguments")


_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "name"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "The checkpoint: TorchScript (.pt), ONNX (.onnx), .pt2 or safetensors."},
                   **{k: {"type": "string", **({"description": v.description} if v.description else {})}
                      for k, v in ModelForm.model_fields.items()}}}}}}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelOut,
             responses=problems(401, 409, 413, 422), openapi_extra=_UPLOAD_DOC)
async def create_model(request: Request, response: Response, principal: SessionlessPrincipal, storage: StorageDep,
                       settings: SettingsDep, idempotency_key: IdempotencyKey) -> ModelOut:
    """Upload a checkpoint. Its bytes decide its format; nothing in it is ever unpickled or executed.

    The form is read in here, not declared as parameters: FastAPI reads declared form fields before it
    resolves dependencies, which would let a caller without a key make the server spool a whole upload.
    """
    await check_form(request, FIELDS, FIELD_LENGTHS)
    async with request.form() as form:  # closes (deletes) the spooled upload on the way out
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise Unprocessable("missing form field: file", code="validation_error",
                                errors=[{"loc": ["body", "file"], "msg": "Field required"}])
        fields = ModelForm.model_validate({k: v for k, v in form.items() if k != "file"})
        if fields.architecture:
            _check_architecture(fields.architecture, settings.max_json_depth)
        with receive(file.file, settings.data_dir / "tmp", settings.max_upload_bytes) as upload:
            # A session only now that the body is on disk; inspection runs a subprocess, off the event loop.
            async with request_session() as db:
                row, created = await run_in_threadpool(
                    _committed, service.create_model, db, storage, settings, principal.tenant_id, upload=upload,
                    name=fields.name, format=fields.format, task=fields.task, architecture=fields.architecture,
                    idempotency_key=idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return model_out(row)


@router.get("", response_model=Page[ModelOut], responses=problems(401, 422))
def list_models(principal: CurrentPrincipal, db: DbSession, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                after: Cursor = None) -> Page[ModelOut]:
    rows, has_more, cursor = paginate(db, select(Model).where(Model.tenant_id == principal.tenant_id), Model,
                                      limit, after)
    return Page[ModelOut](data=[model_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/{model_id}", response_model=ModelOut, responses=problems(401, 404))
def get_model(model_id: str, principal: CurrentPrincipal, db: DbSession) -> ModelOut:
    return model_out(service.get_model(db, principal.tenant_id, model_id))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(401, 404, 409))
def delete_model(model_id: str, principal: CurrentPrincipal, db: DbSession, storage: StorageDep) -> Response:
    key = service.delete_model(db, principal.tenant_id, model_id)
    db.commit()
    storage.delete(key)  # after commit: a failure here leaves an orphan blob, never a row without its blob
    return Response(status_code=status.HTTP_204_NO_CONTENT)
