"""Read a dataset upload's schema from array headers only (no full read, never unpickling).

An ``.npz`` is a zip of ``.npy`` members; each member's header says dtype and shape, which is all
the API needs to answer ``num_rows``/``has_labels`` and to validate a job before it is queued.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from pathlib import Path
from typing import IO, Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.catalog.inspector import run_inspector
from app.catalog.model_files import check_archive, refuse_oversized_schema
from app.errors import Unprocessable
from jobspec import DATASET_FORMATS
from app.settings import get_settings

SUPPORTED_DATASET_FORMATS = DATASET_FORMATS
#: The names a dataset's model inputs are read from (array names, file names in the engine's npz cache).
INPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Use for any request field holding input names, so every route validates them the same way.
InputName = Annotated[str, StringConstraints(pattern=INPUT_NAME.pattern)]
MAX_INPUTS = 16
#: A .npy header longer than this is refused (numpy's own default bound).
MAX_NPY_HEADER = 10_000
#: image_folder: the largest image member (declared size) and the most pixels an image header may declare.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000
#: How far into a JPEG the dimensions (its SOF segment) are looked for.
JPEG_SCAN_BYTES = 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


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


def check_input_names(inputs: list[str] | None) -> list[str] | None:
    """Return ``inputs`` when every name matches INPUT_NAME (at most MAX_INPUTS, no repeats); else 422.

    The names become array lookups and, in the engine, file names: nothing but identifiers is accepted.
    """
    if inputs is None:
        return None
    if len(inputs) > MAX_INPUTS:
        raise Unprocessable(f"'inputs' names {len(inputs)} arrays, at most {MAX_INPUTS} are accepted",
                            code="validation_error")
    for i, name in enumerate(inputs):
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            msg = (f"input name {str(name)[:80]!r} is not allowed: input names are 1 to 64 letters, digits or "
                   f"underscores, not starting with a digit ({INPUT_NAME.pattern})")
            raise Unprocessable(msg, code="validation_error",
                                errors=[{"loc": ["body", "inputs", i], "msg": msg, "type": "invalid_input_name"}])
    if len(set(inputs)) != len(inputs):
        raise Unprocessable(f"'inputs' names an array twice: {inputs}", code="validation_error")
    return inputs


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one ``.npy`` member, from its header only (at most MAX_NPY_HEADER bytes read).

    Refuses object dtypes (they need unpickling) and a header whose shape × itemsize is not the member's
    declared size minus the header, or exceeds ``budget`` bytes: the header is what numpy allocates from.
    """
    name = info.filename[: -len(".npy")]
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _fortran, dtype = readers[version](f, max_header_size=MAX_NPY_HEADER)
        except Exception as exc:
            raise DatasetFileError(f"array {name!r} has no valid .npy header: {exc}") from exc
        header_bytes = f.tell()
    if dtype.hasobject:
        raise DatasetFileError(f"array {name!r} holds Python objects (dtype {dtype}); object arrays need "
                               f"unpickling and are refused. Store numbers only.")
    if any(d < 0 for d in shape):
        raise DatasetFileError(f"array {name!r} declares a negative dimension in shape {list(shape)}")
    data_bytes = math.prod(shape) * dtype.itemsize
    if data_bytes > budget:
        raise DatasetFileError(f"array {name!r} declares shape {list(shape)} of {dtype} ({data_bytes} bytes), more "
                               f"than the limit of {budget} bytes (DISTILLERY_MAX_ARCHIVE_BYTES)")
    if data_bytes != info.file_size - header_bytes:
        raise DatasetFileError(f"array {name!r} declares shape {list(shape)} of {dtype} ({data_bytes} bytes) but "
                               f"its member holds {info.file_size - header_bytes} bytes after the header; "
                               f"the file is damaged or crafted")
    return tuple(shape), dtype


def _npz_arrays(path: Path) -> dict[str, dict]:
    """``{name: {"shape", "dtype"}}`` of every ``.npy`` member, after the archive check (no array data read)."""
    try:
        infos = check_archive(path, DatasetFileError, "the .npz archive")
    except DatasetFileError as exc:
        if zipfile.is_zipfile(path):
            raise
        raise DatasetFileError(f"not an .npz file (a zip of .npy arrays, as np.savez writes): {exc}") from None
    budget = get_settings().max_archive_bytes
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            if info.filename.endswith(".npy"):
                shape, dtype = _npy_header(zf, info, budget)
                arrays[info.filename[: -len(".npy")]] = {"shape": list(shape), "dtype": str(dtype)}
    return arrays


def npz_schema(path: Path, inputs: list[str] | None = None) -> dict:
    """Return ``{"arrays": {name: {"shape", "dtype"}}, "inputs": [...], "num_rows", "has_labels"}``.

    Rules: the input arrays (default ``x``) are numeric with the same first dimension N ≥ 2;
    ``y`` (optional) has N rows; ``x_val``/``y_val`` (optional) match ``x``'s feature shape and each other.
    """
    arrays = _npz_arrays(path)
    inputs = check_input_names(inputs) or ["x"]
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
    in a subprocess (``python -m engine.inspection.dataset``), so the API never imports torch and a
    hostile file can only crash that subprocess. The options are stored in the schema for the worker.

    Zip-based files (npz, pt, image_folder) pass the archive check first, image zips the per-image size
    and pixel limits; the schema is refused when its JSON is over MAX_SCHEMA_BYTES."""
    inputs = check_input_names(inputs)
    opts = options.model_dump(mode="json", exclude_defaults=True)
    if format == "npz":
        return refuse_oversized_schema({**npz_schema(path, inputs), "options": opts}, DatasetFileError)
    if format == "image_folder" or (format == "pt" and zipfile.is_zipfile(path)):
        infos = check_archive(path, DatasetFileError, f"the {format} dataset")
        if format == "image_folder":
            check_image_members(path, infos)
    if format in ("csv", "parquet") and options.label_column is None:
        opts_note = " (no label_column given: every column is a feature and the teacher labels the rows)"
    else:
        opts_note = ""
    args = ["--format", format, "--options", json.dumps(opts)] + (["--inputs", ",".join(inputs)] if inputs else [])
    result = run_inspector("engine.inspection.dataset", args, path, timeout, error=DatasetFileError,
                           what=f"the {format} dataset")
    schema = dict(result.get("schema") or {})
    return refuse_oversized_schema({**schema, "num_rows": int(result["num_rows"]),
                                    "has_labels": bool(result["has_labels"]), "options": opts,
                                    **({"note": opts_note.strip(" ()")} if opts_note else {})}, DatasetFileError)


# ---------------------------------------------------------------------------------------------
# image zips: sizes and pixel counts from the central directory and each image's first bytes


def check_image_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse an image zip with an image member over MAX_IMAGE_BYTES (declared size) or whose header
    declares more than MAX_IMAGE_PIXELS pixels (a few hundred bytes can describe a 40 GB bitmap).
    Only the headers are read; formats whose dimensions are not found are left to the engine's check."""
    images = [i for i in infos if not i.is_dir() and i.filename.lower().endswith(IMAGE_SUFFIXES)]
    for info in images:
        if info.file_size > MAX_IMAGE_BYTES:
            raise DatasetFileError(f"image {info.filename!r} is {info.file_size} bytes, more than the limit of "
                                   f"{MAX_IMAGE_BYTES} bytes per image")
    with zipfile.ZipFile(path) as zf:
        for info in images:
            with zf.open(info) as f:
                dims = image_dimensions(f)
            if dims is not None and dims[0] * dims[1] > MAX_IMAGE_PIXELS:
                raise DatasetFileError(f"image {info.filename!r} declares {dims[0]}×{dims[1]} pixels, more than "
                                       f"the limit of {MAX_IMAGE_PIXELS} pixels per image")


def image_dimensions(f: IO[bytes]) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG, GIF, BMP, WebP or JPEG header read from ``f``; None when unknown."""
    head = f.read(32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"BM" and len(head) >= 26:
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 bitmap header
            return struct.unpack("<HH", head[18:22])
        w, h = struct.unpack("<ii", head[18:26])
        return abs(w), abs(h)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_dimensions(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_dimensions(head[2:], f)
    return None


def _webp_dimensions(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(rest: bytes, f: IO[bytes]) -> tuple[int, int] | None:
    """Walk a JPEG's marker segments (after SOI) to its SOF, within JPEG_SCAN_BYTES."""
    buf, pos = bytearray(rest), 0

    def need(n: int) -> bool:
        while len(buf) < pos + n and len(buf) < JPEG_SCAN_BYTES:
            more = f.read(min(65536, JPEG_SCAN_BYTES - len(buf)))
            if not more:
                break
            buf.extend(more)
        return len(buf) >= pos + n

    while need(4):
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
            pos += 2
            continue
        length = int.from_bytes(buf[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF:
            if not need(9):
                return None
            h, w = struct.unpack(">HH", bytes(buf[pos + 5:pos + 9]))
            return w, h
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any SOF
            return None
        pos += 2 + length
    return None
