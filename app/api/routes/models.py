"""/v1/models — teacher (and student) checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import CurrentPrincipal, DbSession, IdempotencyKey, SettingsDep, StorageDep
from app.api.docs import problems
from app.api.schemas import ModelOut, Page, model_out
from app.api.uploads import reject_unknown_fields
from app.catalog import service
from app.catalog.uploads import receive
from app.db.models import Model
from app.pagination import paginate

router = APIRouter(prefix="/v1/models", tags=["models"])
FIELDS = {"file", "name", "format", "task", "architecture"}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelOut,
             responses=problems(401, 409, 413, 422))
async def create_model(
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    db: DbSession,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey,
    file: Annotated[UploadFile, File(description="The checkpoint: TorchScript (.pt) or ONNX (.onnx).")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    format: Annotated[str | None, Form(description="torchscript | onnx | torch_export | safetensors; "
                                                   "detected from content when absent")] = None,
    task: Annotated[str, Form()] = "classification",
    architecture: Annotated[str | None, Form(description="JSON: a built-in family and its arguments")] = None,
) -> ModelOut:
    """Upload a checkpoint. Its bytes decide its format; nothing in it is ever unpickled or executed."""
    await reject_unknown_fields(request, FIELDS)
    with receive(file.file, settings.data_dir / "tmp", settings.max_upload_bytes) as upload:
        # Inspection runs a subprocess; keep it off the event loop.
        row, created = await run_in_threadpool(
            service.create_model, db, storage, settings, principal.tenant_id, upload=upload, name=name,
            format=format, task=task, architecture=architecture, idempotency_key=idempotency_key)
        db.commit()
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return model_out(row)


@router.get("", response_model=Page[ModelOut], responses=problems(401, 422))
def list_models(principal: CurrentPrincipal, db: DbSession, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                after: str | None = None) -> Page[ModelOut]:
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
