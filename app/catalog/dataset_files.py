"""Read a dataset upload's schema from array headers only (no full read, never unpickling).

An ``.npz`` is a zip of ``.npy`` members; each member's header says dtype and shape, which is all
the API needs to answer ``num_rows``/``has_labels`` and to validate a job before it is queued.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from app.errors import Unprocessable

SUPPORTED_DATASET_FORMATS = ("npz",)


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
    for labels, feats in (("y", inputs[0]), ("y_val", "x_val")):
        if labels in arrays:
            if feats not in arrays:
                raise DatasetFileError(f"{labels!r} is present but {feats!r} is not")
            if np.dtype(arrays[labels]["dtype"]).kind not in "biuf":
                raise DatasetFileError(f"labels {labels!r} must be numeric, got {arrays[labels]['dtype']}")
            if arrays[labels]["shape"][:1] != arrays[feats]["shape"][:1]:
                raise DatasetFileError(f"{labels!r} has {arrays[labels]['shape'][0] if arrays[labels]['shape'] else 0} "
                                       f"rows but {feats!r} has {arrays[feats]['shape'][0]}")
    if "x_val" in arrays and arrays["x_val"]["shape"][1:] != arrays[inputs[0]]["shape"][1:]:
        raise DatasetFileError(f"'x_val' rows have shape {arrays['x_val']['shape'][1:]} but "
                               f"{inputs[0]!r} rows have {arrays[inputs[0]]['shape'][1:]}")
    if ("x_val" in arrays) and ("y" in arrays) != ("y_val" in arrays):
        raise DatasetFileError("give labels for both splits ('y' and 'y_val') or for neither")
    return {"arrays": arrays, "inputs": inputs, "num_rows": int(n), "has_labels": "y" in arrays}
