"""``client.datasets``: transfer data — ``/v1/datasets`` (an upload, or a reference by URI)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from distillery_client._flow import FileSource
from distillery_client.resources._base import MAX_PAGE_SIZE, Resource, idempotency_headers, object_id
from distillery_client.resources._forms import form, json_field, upload_name
from distillery_client.types import Dataset


class Datasets(Resource):
    def upload(self, path: FileSource, name: str, format: str, *, inputs: Sequence[str] | None = None,
               label_column: str | None = None, options: dict[str, Any] | None = None, filename: str | None = None,
               idempotency_key: str | None = None) -> Dataset:
        """Upload a data file. ``format``: npz | pt | csv | parquet | jsonl | image_folder; ``inputs``: the arrays
        fed to the model (default ``["x"]``); ``label_column`` for tabular files; ``options`` for images."""
        data = form(name=name, format=format, inputs=json_field(list(inputs) if inputs is not None else None),
                    label_column=label_column, options=json_field(options))
        return self._run(self._call("POST", "/v1/datasets", Dataset.from_dict, data=data,
                                    files={"file": (upload_name(path, filename), path)},
                                    headers=idempotency_headers(idempotency_key)))

    def create(self, *, uri: str, name: str, format: str = "npz", inputs: Sequence[str] | None = None,
               label_column: str | None = None, options: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> Dataset:
        """Register data the server reads itself: ``file://`` under its allowed roots (``s3://`` / ``https://``
        where the deployment allows them)."""
        body = {"uri": uri, "name": name, "format": format, "inputs": list(inputs) if inputs is not None else None,
                "label_column": label_column, "options": options}
        return self._run(self._call("POST", "/v1/datasets", Dataset.from_dict,
                                    json={k: v for k, v in body.items() if v is not None},
                                    headers=idempotency_headers(idempotency_key)))

    def list(self, *, page_size: int = MAX_PAGE_SIZE, max_items: int | None = None) -> Iterator[Dataset]:
        return self._iter(self._pages("/v1/datasets", Dataset.from_dict, page_size=page_size, max_items=max_items))

    def retrieve(self, dataset_id: str | Dataset) -> Dataset:
        return self._run(self._call("GET", f"/v1/datasets/{object_id(dataset_id)}", Dataset.from_dict))

    def delete(self, dataset_id: str | Dataset) -> None:
        return self._run(self._call("DELETE", f"/v1/datasets/{object_id(dataset_id)}"))
