"""Register, list and delete teacher models and datasets for a tenant.

Every lookup is scoped to the tenant: another tenant's resource is indistinguishable from a
missing one (both ``NotFound``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import event, exists, select
from sqlalchemy.orm import Session

from app import idempotency
from app.catalog.dataset_files import SUPPORTED_DATASET_FORMATS, DatasetOptions, dataset_schema
from app.catalog.model_files import ALL_MODEL_FORMATS, Inspection, inspect_model_file
from app.catalog.uploads import Received
from app.db.models import Dataset, Job, JobInput, Model
from app.errors import Conflict, NotFound, Unprocessable
from app.ids import new_id
from jobspec import STUDENT_FAMILIES, TASKS
from app.jobs.state import ACTIVE
from app.settings import Settings
from app.storage import Storage, StoredBlob

log = logging.getLogger("distillery.catalog")
_UNCOMMITTED_BLOBS = "distillery.uncommitted_blobs"


def _put_blob(session: Session, storage: Storage, key: str, upload: Received) -> StoredBlob:
    """Store the upload under ``key``; the blob is deleted again unless ``session`` commits (a failed
    flush or commit, a rollback, a session closed without commit), so no blob outlives its row."""
    session.info.setdefault(_UNCOMMITTED_BLOBS, []).append((storage, key))
    return storage.put_file(key, upload.path)


@event.listens_for(Session, "after_commit")
def _keep_blobs(session: Session) -> None:
    session.info.pop(_UNCOMMITTED_BLOBS, None)


@event.listens_for(Session, "after_transaction_end")
def _discard_blobs(session: Session, transaction) -> None:
    if transaction.parent is not None or transaction.nested:
        return  # a savepoint or subtransaction ending decides nothing about the outer one
    for storage, key in session.info.pop(_UNCOMMITTED_BLOBS, []):
        try:
            storage.delete(key)
        except Exception:  # an orphan blob is worth a log line, not the request's real error
            log.exception("could not delete blob %s of a transaction that did not commit", key)


def get_model(session: Session, tenant_id: str, model_id: str) -> Model:
    row = session.get(Model, model_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no model {model_id}")
    return row


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no dataset {dataset_id}")
    return row


def _parse_architecture(raw: str | None) -> dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"'architecture' is not valid JSON: {exc}", code="invalid_architecture") from exc
    if not isinstance(value, dict) or "family" not in value:
        raise Unprocessable("'architecture' must be a JSON object with a 'family'", code="invalid_architecture")
    if value["family"] not in STUDENT_FAMILIES:
        raise Unprocessable(f"architecture family {value['family']!r} is not built in; "
                            f"built-in: {', '.join(STUDENT_FAMILIES)}", code="invalid_architecture")
    return value


def _inspected_before(session: Session, tenant_id: str, sha256: str, format: str | None,
                      architecture: dict[str, Any] | None) -> Inspection | None:
    """What the inspection of this very file found when this tenant registered it before (same bytes, same
    declared format and architecture), so a re-upload (a pipeline that registers its teacher on every run) is
    not inspected again. Only the tenant's own rows count: another tenant's would tell, by the time saved,
    that someone holds the same file. The job's executor checks the model again at start, as for every job."""
    rows = session.scalars(select(Model).where(Model.tenant_id == tenant_id, Model.sha256 == sha256))
    for row in rows:
        if row.architecture == architecture and format in (None, row.format):
            return Inspection(format=row.format, num_parameters=row.num_parameters, io_schema=row.io_schema)
    return None


def create_model(session: Session, storage: Storage, settings: Settings, tenant_id: str, *, upload: Received,
                 name: str, format: str | None, task: str, architecture: str | None,
                 idempotency_key: str | None) -> tuple[Model, bool]:
    """Inspect and store an uploaded checkpoint. Returns (model, created) — created False on replay."""
    if format is not None and format not in ALL_MODEL_FORMATS:
        raise Unprocessable(f"format must be one of {', '.join(ALL_MODEL_FORMATS)}", code="invalid_format")
    if task not in TASKS:
        raise Unprocessable(f"task must be one of {', '.join(TASKS)}", code="invalid_task")
    arch = _parse_architecture(architecture)
    req = idempotency.request_hash({"name": name, "format": format, "task": task, "architecture": arch,
                                    "sha256": upload.sha256})
    if (prior := idempotency.lookup(session, tenant_id, "models", idempotency_key, req)) is not None:
        return get_model(session, tenant_id, prior), False
    model_id = new_id("model")
    # Claimed before the inspection and the blob: concurrent identical uploads wait here and replay the
    # winner's model rather than each inspecting and storing a copy.
    if (prior := idempotency.claim(session, tenant_id, "models", idempotency_key, req, model_id)) is not None:
        return get_model(session, tenant_id, prior), False
    found = (_inspected_before(session, tenant_id, upload.sha256, format, arch)
             or inspect_model_file(upload.path, format, settings.inspect_timeout_seconds, arch))
    if (found.format == "hf_transformers") != (task == "causal_lm"):
        raise Unprocessable("a generative language model is uploaded as format 'hf_transformers' with task "
                            f"'causal_lm' (this upload: format {found.format}, task {task})", code="invalid_task")
    blob = _put_blob(session, storage, f"models/{model_id}", upload)  # blob first, then the row
    row = Model(id=model_id, tenant_id=tenant_id, name=name, format=found.format, task=task, architecture=arch,
                io_schema=found.io_schema, size_bytes=blob.size_bytes, sha256=upload.sha256,
                num_parameters=found.num_parameters, storage_key=blob.key)
    session.add(row)
    session.flush()
    return row, True


def create_dataset(session: Session, storage: Storage, settings: Settings, tenant_id: str, *, upload: Received,
                   name: str, format: str, inputs: list[str] | None, options: DatasetOptions,
                   idempotency_key: str | None) -> tuple[Dataset, bool]:
    if format not in SUPPORTED_DATASET_FORMATS:
        raise Unprocessable(f"dataset format '{format}' is not supported by this deployment; "
                            f"supported: {', '.join(SUPPORTED_DATASET_FORMATS)}", code="unsupported_format")
    req = idempotency.request_hash({"name": name, "format": format, "inputs": inputs, "sha256": upload.sha256,
                                    "options": options.model_dump(mode="json")})
    if (prior := idempotency.lookup(session, tenant_id, "datasets", idempotency_key, req)) is not None:
        return get_dataset(session, tenant_id, prior), False
    dataset_id = new_id("dataset")
    if (prior := idempotency.claim(session, tenant_id, "datasets", idempotency_key, req, dataset_id)) is not None:
        return get_dataset(session, tenant_id, prior), False
    schema = dataset_schema(upload.path, format, inputs, options, settings.inspect_timeout_seconds)
    blob = _put_blob(session, storage, f"datasets/{dataset_id}", upload)
    row = Dataset(id=dataset_id, tenant_id=tenant_id, name=name, format=format, num_rows=schema["num_rows"],
                  size_bytes=blob.size_bytes, sha256=upload.sha256, has_labels=schema["has_labels"],
                  schema_=schema, storage_key=blob.key)
    session.add(row)
    session.flush()
    return row, True


def _in_use(session: Session, resource_id: str) -> bool:
    return bool(session.scalar(select(exists().where(JobInput.resource_id == resource_id,
                                                     JobInput.job_id == Job.id, Job.status.in_(ACTIVE)))))


def delete_model(session: Session, tenant_id: str, model_id: str) -> str:
    """Delete the row; returns the blob key for the caller to remove after commit. 409 while a job needs it."""
    row = get_model(session, tenant_id, model_id)
    if _in_use(session, model_id):
        raise Conflict(f"model {model_id} is used by a job that has not finished; cancel it first", code="in_use")
    session.delete(row)  # finished jobs keep the id in their spec; the FK is set to NULL
    return row.storage_key


def delete_dataset(session: Session, tenant_id: str, dataset_id: str) -> str:
    row = get_dataset(session, tenant_id, dataset_id)
    if _in_use(session, dataset_id):
        raise Conflict(f"dataset {dataset_id} is used by a job that has not finished; cancel it first", code="in_use")
    session.delete(row)
    return row.storage_key
