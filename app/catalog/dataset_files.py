"""Read a dataset upload's schema from array headers only (no full read, never unpickling).

An ``.npz`` is a zip of ``.npy`` members; each member's header says dtype and shape, which is all
the API needs to answer ``num_rows``/``has_labels`` and to validate a job before it is queued.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.catalog.inspector import run_inspector
from app.errors import Unprocessable
from app.jobs.spec import DATASET_FORMATS

SUPPORTED_DATASET_FORMATS = DATASET_FORMATS


class DatasetOptions(BaseModel):
    """How to read a dataset; stored with it and applied by the worker's loader."""

    model_config = ConfigDict(extra="forbid")
    label_column: str | None = Field(None, max_length=200, description="csv/parquet: the label column.")
    image_size: tuple[int, int] = Field((32, 32), description="image_folder: resize to H×W.")
    grayscale: bool = Field(False, description="image_folder: one channel instead of RGB.")
    normalize: Literal["none", "dataset", "imagenet"] = Field(
        "none", description="image_folder: per-channel normalisation applied before the teacher sees the pixels "
                            "(none: [0, 1] floats; dataset: this set's mean/std; imagenet: ImageNet's mean/std). "
                            "Use what the teacher was trained with.")

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= d <= 2048 for d in v):
            raise ValueError("image_size must be two sizes between 1 and 2048")
        return v


class DatasetFileError(Unprocessable):
    code = "invalid_dataset_file"


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(name) as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _fortran, dtype = reader[version](f)  # type: ignore[index]
        except Exception as exc:
            raise DatasetFileError(f"array {name!r} has no valid .npy header: {exc}") from exc
    return tuple(shape), dtype


def npz_schema(path: Path, inputs: list[str] | None = None) -> dict:
    """Return ``{"arrays": {name: {"shape", "dtype"}}, "inputs": [...], "num_rows", "has_labels"}``.

    Rules: the input arrays (default ``x``) are numeric with the same first dimension N ≥ 2;
    ``y`` (optional) has N rows; ``x_val``/``y_val`` (optional) match ``x``'s feature shape and each other.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetFileError(f"not an .npz file (a zip of .npy arrays, as np.savez writes): {exc}") from exc
    with zf:
        arrays = {}
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            shape, dtype = _npy_header(zf, member)
            name = member[: -len(".npy")]
            if dtype.hasobject:
                raise DatasetFileError(f"array {name!r} holds Python objects (dtype {dtype}); object arrays need "
                                       f"unpickling and are refused. Store numbers only.")
            arrays[name] = {"shape": list(shape), "dtype": str(dtype)}
    inputs = inputs or ["x"]
    for name in inputs:
        if name not in arrays:
            raise DatasetFileError(f"the .npz has no array {name!r} (found: {sorted(arrays) or 'none'}); "
                                   f"save inputs as np.savez(path, x=inputs, y=labels)")
        kind = np.dtype(arrays[name]["dtype"]).kind
        if kind not in "biuf":
            raise DatasetFileError(f"array {name!r} has dtype {arrays[name]['dtype']}; inputs must be numeric")
        if len(arrays[name]["shape"]) < 1:
            raise DatasetFileError(f"array {name!r} is a scalar; inputs must be N×… with one row per example")
    n = arrays[inputs[0]]["shape"][0]
    if n < 2:
        raise DatasetFileError(f"array {inputs[0]!r} has {n} rows; at least 2 are needed")
    for name in inputs[1:]:
        if arrays[name]["shape"][0] != n:
            raise DatasetFileError(f"input arrays disagree on the number of rows: {inputs[0]!r} has {n}, "
                                   f"{name!r} has {arrays[name]['shape'][0]}")
    val_inputs = [f"{name}_val" for name in inputs]
    for name, val in zip(inputs, val_inputs, strict=True):
        if val in arrays and arrays[val]["shape"][1:] != arrays[name]["shape"][1:]:
            raise DatasetFileError(f"{val!r} rows have shape {arrays[val]['shape'][1:]} but "
                                   f"{name!r} rows have {arrays[name]['shape'][1:]}")
    for labels, feats in (("y", inputs[0]), ("y_val", val_inputs[0])):
        if labels in arrays:
            if feats not in arrays:
                raise DatasetFileError(f"{labels!r} is present but {feats!r} is not")
            if np.dtype(arrays[labels]["dtype"]).kind not in "biuf":
                raise DatasetFileError(f"labels {labels!r} must be numeric, got {arrays[labels]['dtype']}")
            if arrays[labels]["shape"][:1] != arrays[feats]["shape"][:1]:
                raise DatasetFileError(f"{labels!r} has {arrays[labels]['shape'][0] if arrays[labels]['shape'] else 0} "
                                       f"rows but {feats!r} has {arrays[feats]['shape'][0]}")
    if (val_inputs[0] in arrays) and ("y" in arrays) != ("y_val" in arrays):
        raise DatasetFileError("give labels for both splits ('y' and 'y_val') or for neither")
    return {"arrays": arrays, "inputs": inputs, "num_rows": int(n), "has_labels": "y" in arrays}


def dataset_schema(path: Path, format: str, inputs: list[str] | None, options: DatasetOptions,
                   timeout: float) -> dict:
    """Schema of any supported dataset: npz from its headers here; other formats by the engine's reader
    in a subprocess (``python -m worker.engine.inspect_data``), so the API never imports torch and a
    hostile file can only crash that subprocess. The options are stored in the schema for the worker."""
    opts = options.model_dump(mode="json", exclude_defaults=True)
    if format == "npz":
        return {**npz_schema(path, inputs), "options": opts}
    if format in ("csv", "parquet") and options.label_column is None:
        opts_note = " (no label_column given: every column is a feature and the teacher labels the rows)"
    else:
        opts_note = ""
    args = ["--format", format, "--options", json.dumps(opts)] + (["--inputs", ",".join(inputs)] if inputs else [])
    result = run_inspector("worker.engine.inspect_data", args, path, timeout, error=DatasetFileError,
                           what=f"the {format} dataset")
    schema = dict(result.get("schema") or {})
    return {**schema, "num_rows": int(result["num_rows"]), "has_labels": bool(result["has_labels"]),
            "options": opts, **({"note": opts_note.strip(" ()")} if opts_note else {})}
