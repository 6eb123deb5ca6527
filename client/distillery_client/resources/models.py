"""``client.models``: teacher (and student) checkpoints — ``/v1/models``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from distillery_client._flow import FileSource
from distillery_client.resources._base import MAX_PAGE_SIZE, Resource, idempotency_headers, object_id
from distillery_client.resources._forms import form, json_field, upload_name
from distillery_client.types import Model


class Models(Resource):
    def upload(self, path: FileSource, name: str, format: str | None = None, task: str | None = None,
               architecture: dict[str, Any] | str | None = None, *, filename: str | None = None,
               idempotency_key: str | None = None) -> Model:
        """Upload a checkpoint (a path or a binary file object). ``format``: torchscript | onnx | torch_export |
        safetensors (detected from the bytes when absent); ``task``: classification (the server's default) |
        regression | embedding; ``architecture`` (a dict or its JSON) is required for safetensors."""
        data = form(name=name, format=format, task=task, architecture=json_field(architecture))
        return self._run(self._call("POST", "/v1/models", Model.from_dict, data=data,
                                    files={"file": (upload_name(path, filename), path)},
                                    headers=idempotency_headers(idempotency_key)))

    def list(self, *, page_size: int = MAX_PAGE_SIZE, max_items: int | None = None) -> Iterator[Model]:
        """Every model of your tenant, newest first (follows the cursors)."""
        return self._iter(self._pages("/v1/models", Model.from_dict, page_size=page_size, max_items=max_items))

    def retrieve(self, model_id: str | Model) -> Model:
        return self._run(self._call("GET", f"/v1/models/{object_id(model_id)}", Model.from_dict))

    def delete(self, model_id: str | Model) -> None:
        """Delete it (409 :class:`~distillery_client.ConflictError` while an unfinished job uses it)."""
        return self._run(self._call("DELETE", f"/v1/models/{object_id(model_id)}"))
