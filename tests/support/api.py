"""Helpers of the in-process API tests: a model upload, a pickle that proves code ran, an artifact stored the
way the worker stores one."""

from __future__ import annotations

import tempfile
from pathlib import Path


def upload(client, headers, content: bytes, name="teacher", filename="teacher.bin", **fields):
    """POST ``content`` to /v1/models as ``filename``; extra form fields from ``fields``."""
    return client.post("/v1/models", headers=headers, files={"file": (filename, content)},
                       data={"name": name, **fields})


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_artifact(job_id: str, content: bytes) -> str:
    """Store ``content`` as a student artifact of ``job_id`` the way the worker does."""
    from app.db.models import Artifact, Job
    from app.db.session import session_scope
    from app.ids import new_id
    from app.storage import get_storage

    art_id = new_id("artifact")
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(content)
    blob = get_storage().put_file(f"artifacts/{job_id}/{art_id}/student.onnx", Path(f.name))
    with session_scope() as s:
        tenant = s.get(Job, job_id).tenant_id
        s.add(Artifact(id=art_id, tenant_id=tenant, job_id=job_id, kind="student", format="onnx", step_index=0,
                       filename="student.onnx", media_type="application/octet-stream", size_bytes=blob.size_bytes,
                       sha256=blob.sha256, storage_key=blob.key))
    return art_id
