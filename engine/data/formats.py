"""Dataset loading, checking and the train/held-out split (registry ``dataset_formats``).

Input: a :class:`DatasetSource`. Output: a :class:`Dataset` of numpy arrays:

* ``x``: ``{input_name: array [N, *row_shape]}`` in ``inputs`` order; float inputs are
  float32, integer inputs (token ids, masks) int64. Large ``.npz`` members are
  memory-mapped (``np.memmap``), never read whole.
* ``y``: labels [N] (int64 class ids when integral, else float32 regression
  targets, possibly [N, D]) or None (unlabelled)
* ``x_val`` / ``y_val``: optional explicit held-out arrays, same layout
* ``classes``: class names for ``image_folder``

Formats and their files:

* ``npz``: arrays named by ``inputs`` (default ``x``), ``y``; held-out ``<input>_val``, ``y_val``.
* ``pt``: a ``torch.save``'d dict of tensors with the same keys (loaded with ``weights_only=True``).
* ``csv`` / ``parquet``: one row per example; ``options.label_column`` names the label
  column (optional); every other column is a numeric feature of the single input.
* ``image_folder``: a zip of ``<class>/<image>.png|jpg`` (or ``train/<class>/...`` and
  ``val/<class>/...``); options ``image_size`` [H, W] (default [32, 32]), ``grayscale``
  (default false), ``normalize`` ``"none"`` (default) | ``"dataset"`` | ``"imagenet"``.

Every problem is an ``EngineError("invalid_dataset", ...)`` naming the array/column.
Nothing is ever unpickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import hashlib
import io
import math
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.registry import EmptyConfig, dataset_formats
from engine.values import DatasetSource
from engine.errors import EngineError
from engine.inspection.zipcheck import ENGINE_MAX_TOTAL_BYTES, refuse_unsafe_zip

#: npz files larger than this are memory-mapped (members extracted to .npy in a cache dir).
NPZ_MMAP_THRESHOLD = 512 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Input names (array names, and file names in the npz cache): the API accepts nothing else either.
INPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CACHE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: A .npy header longer than this is refused (numpy's own default bound).
MAX_NPY_HEADER = 10_000
#: image_folder: the largest image member and the most pixels one image may have (checked before decoding).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Dataset:
    inputs: list[str]
    x: dict[str, np.ndarray]
    y: np.ndarray | None
    x_val: dict[str, np.ndarray] | None = None
    y_val: np.ndarray | None = None
    classes: list[str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def input_name(self) -> str:
        return self.inputs[0]

    @property
    def num_rows(self) -> int:
        return int(self.x[self.inputs[0]].shape[0])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.x[self.inputs[0]].shape[1:])

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[1:]) for k, v in self.x.items()}

    def is_integer(self, name: str) -> bool:
        return bool(np.issubdtype(self.x[name].dtype, np.integer))

    @property
    def labels_are_classes(self) -> bool:
        return self.y is not None and self.y.dtype == np.int64 and self.y.ndim == 1


@dataclass
class Split:
    """Arrays actually used for training and held-out evaluation (dicts of arrays)."""

    x_train: dict[str, np.ndarray]
    y_train: np.ndarray | None
    x_val: dict[str, np.ndarray]
    y_val: np.ndarray | None
    val_source: str  # "x_val" (explicit held-out arrays), "split" (carved from x), "eval_dataset", "synthetic"

    @property
    def n_train(self) -> int:
        return int(next(iter(self.x_train.values())).shape[0])

    @property
    def n_val(self) -> int:
        return int(next(iter(self.x_val.values())).shape[0])


def _bad(message: str) -> EngineError:
    return EngineError("invalid_dataset", message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# checks shared by every format


def _check_inputs(name: str, x: np.ndarray) -> np.ndarray:
    numeric = np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)
    if not (numeric or x.dtype == bool):
        raise _bad(f"array {name!r} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise _bad(f"array {name!r} must have shape [rows, features...], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise _bad(f"array {name!r} has no rows")
    if any(d == 0 for d in x.shape[1:]):
        raise _bad(f"array {name!r} has an empty feature dimension: shape {list(x.shape)}")
    if isinstance(x, np.memmap):
        # Memory-mapped: converted per batch; not scanned whole (that is the point).
        return x
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.int64, copy=False)
        if len(x) and x.min() < 0:
            raise _bad(f"integer array {name!r} contains negative value {int(x.min())} (token ids must be >= 0)")
        return np.ascontiguousarray(x)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise _bad(f"array {name!r} contains NaN or infinite values")
    return np.ascontiguousarray(x)


def _check_labels(name: str, y: np.ndarray, rows: int, x_name: str) -> np.ndarray:
    if y.ndim not in (1, 2):
        raise _bad(f"array {name!r} must be 1-D class ids or [rows, outputs] targets, got shape {list(y.shape)}")
    if len(y) != rows:
        raise _bad(f"array {name!r} has {len(y)} rows but {x_name!r} has {rows}")
    numeric = np.issubdtype(y.dtype, np.number) or y.dtype == bool
    if not numeric or np.issubdtype(y.dtype, np.complexfloating):
        raise _bad(f"array {name!r} must be numeric, got dtype {y.dtype}")
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise _bad(f"array {name!r} contains NaN or infinite values")
        if y.ndim == 1 and np.all(np.mod(y, 1) == 0) and (len(y) == 0 or y.min() >= 0):
            return y.astype(np.int64)  # integral float labels: class ids (regression accepts them too)
        return y.astype(np.float32)
    if y.ndim == 2:
        return y.astype(np.float32)
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise _bad(f"array {name!r} contains negative class id {int(y.min())}")
    return y


def check_dataset(
    inputs: list[str],
    x: dict[str, np.ndarray | None],
    y: np.ndarray | None,
    x_val: dict[str, np.ndarray | None] | None,
    y_val: np.ndarray | None,
) -> Dataset:
    """Validate raw arrays and normalise dtypes (float -> float32, int -> int64, labels)."""
    out: dict[str, np.ndarray] = {}
    for name in inputs:
        if x.get(name) is None:
            raise _bad(f"dataset has no array {name!r}")
        out[name] = _check_inputs(name, x[name])  # type: ignore[arg-type]
    first = inputs[0]
    rows = out[first].shape[0]
    for name in inputs[1:]:
        if out[name].shape[0] != rows:
            raise _bad(f"array {name!r} has {out[name].shape[0]} rows but {first!r} has {rows}")
    if y is not None:
        y = _check_labels("y", y, rows, first)
    val_names = {n: _val_name(n) for n in inputs}
    vals = {n: v for n, v in (x_val or {}).items() if v is not None}
    if y_val is not None and not vals:
        raise _bad(f"dataset has 'y_val' but no {val_names[first]!r}")
    out_val: dict[str, np.ndarray] | None = None
    if vals:
        missing = [val_names[n] for n in inputs if n not in vals]
        if missing:
            raise _bad(f"dataset has held-out arrays for some inputs but not {', '.join(map(repr, missing))}")
        out_val = {}
        for name in inputs:
            v = _check_inputs(val_names[name], vals[name])
            if v.shape[1:] != out[name].shape[1:]:
                raise _bad(
                    f"array {val_names[name]!r} has per-row shape {list(v.shape[1:])} "
                    f"but {name!r} has {list(out[name].shape[1:])}"
                )
            out_val[name] = v
        vrows = out_val[first].shape[0]
        for name in inputs[1:]:
            if out_val[name].shape[0] != vrows:
                raise _bad(f"array {val_names[name]!r} has {out_val[name].shape[0]} rows but "
                           f"{val_names[first]!r} has {vrows}")
        if y_val is not None:
            y_val = _check_labels("y_val", y_val, vrows, val_names[first])
        if (y is None) != (y_val is None):
            raise _bad(
                f"labels must be given for both training and held-out rows: "
                f"'y' is {'present' if y is not None else 'absent'}, "
                f"'y_val' is {'present' if y_val is not None else 'absent'}"
            )
        if y is not None and y_val is not None and y.dtype != y_val.dtype:
            # one side integral, the other not: regression targets on both sides
            y, y_val = y.astype(np.float32), y_val.astype(np.float32)
    elif rows < 2:
        raise _bad(f"array {first!r} needs at least 2 rows to hold one out for evaluation, got {rows}")
    return Dataset(list(inputs), out, y, out_val, y_val)


def _val_name(name: str) -> str:
    return f"{name}_val"


def check_label_range(dataset: Dataset, num_classes: int) -> None:
    """Class ids must index the teacher's outputs: 0 <= y < num_classes."""
    for key, y in (("y", dataset.y), ("y_val", dataset.y_val)):
        if y is None:
            continue
        if y.dtype != np.int64 or y.ndim != 1:
            raise _bad(f"array {key!r} holds non-integer values ({y.dtype}, shape {list(y.shape)}); "
                       "a classification teacher needs integer class ids")
        if len(y) and int(y.max()) >= num_classes:
            raise _bad(
                f"array {key!r} contains class id {int(y.max())} but the teacher has {num_classes} outputs "
                f"(valid class ids are 0..{num_classes - 1})"
            )


# ---------------------------------------------------------------------------------------------
# formats


class _Format(ABC):
    Config = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None):
        self.config = config

    @abstractmethod
    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        """Read the file into a :class:`Dataset` (inputs N×…, labels, held-out split when present)."""


def check_input_name(name: str) -> str:
    """``name`` when it matches INPUT_NAME; else ``EngineError("invalid_dataset")``. Input names become
    array lookups and cache file names, so nothing that could name a path gets through."""
    if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
        raise _bad(f"input name {str(name)[:80]!r} is not allowed: input names are 1 to 64 letters, digits or "
                   f"underscores, not starting with a digit")
    return name


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of an npz's ``.npy`` members, from their headers (no array data).

    The archive is checked first (:func:`.zipcheck.refuse_unsafe_zip`); object dtypes, and headers whose
    shape × itemsize disagrees with the member's declared size (what numpy would allocate from), are
    refused with ``EngineError("invalid_dataset")``.
    """
    infos = refuse_unsafe_zip(path, "invalid_dataset", "the .npz dataset")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in infos:
                if info.filename.endswith(".npy"):
                    out[info.filename[:-4]] = _npy_header(zf, info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _bad(f"cannot read dataset as .npz: {_first_line(exc)}") from None
    return out


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    name = info.filename[:-4]
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _fortran, dtype = readers[version](f, max_header_size=MAX_NPY_HEADER)
        except ValueError as exc:
            raise _bad(f"array {name!r} has no valid .npy header: {_first_line(exc)}") from None
        header_bytes = f.tell()
    if dtype.hasobject:
        raise _bad(f"array {name!r} holds Python objects (needs pickle); save numeric arrays only")
    data_bytes = math.prod(shape) * dtype.itemsize
    if any(d < 0 for d in shape) or data_bytes > ENGINE_MAX_TOTAL_BYTES or data_bytes != info.file_size - header_bytes:
        raise _bad(f"array {name!r} declares shape {list(shape)} of {dtype} ({data_bytes} bytes) but its member "
                   f"holds {info.file_size - header_bytes} bytes after the header; the file is damaged or crafted")
    return tuple(int(d) for d in shape), dtype


def _cache_file(target: Path, key: str) -> Path:
    """``target/<key>.npy`` for a validated array name, resolved and checked to lie inside ``target``."""
    if not _CACHE_NAME.fullmatch(key):  # an input name, or one with "_val" appended
        raise _bad(f"array {key[:80]!r} cannot be unpacked: only letters, digits and underscores are allowed")
    root = target.resolve()
    dest = (root / f"{key}.npy").resolve()
    if dest.parent != root:
        raise _bad(f"array {key!r} would be unpacked outside the dataset cache")
    return dest


def _mmap_npz(path: Path, keys: list[str], cache_dir: Path) -> dict[str, np.ndarray]:
    """Extract the members ``keys`` of a (large, already checked) npz to .npy files and memory-map them."""
    digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
    target = Path(cache_dir) / f"npz-{digest[:16]}"
    target.mkdir(parents=True, exist_ok=True)
    out = {}
    with zipfile.ZipFile(path) as zf:
        for key in keys:
            dest = _cache_file(target, key)
            if not dest.exists():
                tmp = dest.with_suffix(".tmp")
                with zf.open(f"{key}.npy") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                tmp.replace(dest)
            try:
                arr = np.load(dest, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise _bad(f"array {key!r} cannot be read without pickle: {_first_line(exc)}") from None
            out[key] = arr
    return out


@dataset_formats.register("npz")
class NpzDataset(_Format):
    """numpy ``.npz`` archive (``np.savez`` / ``np.savez_compressed``); large files are memory-mapped."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        if not path.is_file():
            raise _bad(f"dataset file not found: {path}")
        names = list(inputs)
        wanted = names + [_val_name(n) for n in names] + ["y", "y_val"]
        # Check the archive and every array header before numpy reads anything.
        present = set(npz_headers(path)) if zipfile.is_zipfile(path) else set()
        if cache_dir is not None and path.stat().st_size > NPZ_MMAP_THRESHOLD:
            _require(names, present)
            arrays = _mmap_npz(path, [k for k in wanted if k in present], cache_dir)
            # labels are small: read them whole
            for k in ("y", "y_val"):
                if k in arrays:
                    arrays[k] = np.asarray(arrays[k])
            ds = _from_arrays(names, arrays)
            ds.notes["memory_mapped"] = True
            return ds
        # Open the file ourselves: np.load leaks the handle when the zip is corrupt.
        with open(path, "rb") as fh:
            try:
                archive = np.load(fh, allow_pickle=False)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise _bad(f"cannot read dataset as .npz: {_first_line(exc)}") from None
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise _bad("dataset is a single .npy array, expected an .npz archive with named arrays")
            with archive:
                present = set(archive.files)
                _require(names, present)
                arrays = {}
                for key in wanted:
                    if key not in present:
                        continue
                    try:
                        arrays[key] = archive[key]
                    except ValueError as exc:  # object arrays need pickle: refuse
                        raise _bad(f"array {key!r} cannot be read without pickle: {_first_line(exc)}") from None
                    except (OSError, zipfile.BadZipFile, EOFError) as exc:
                        raise _bad(f"array {key!r} is corrupt: {_first_line(exc)}") from None
        return _from_arrays(names, arrays)


def _require(names: list[str], present: set[str]) -> None:
    for name in names:
        if name not in present:
            raise _bad(f"dataset has no array {name!r} (found: {', '.join(sorted(present)) or 'none'})")


def _from_arrays(names: list[str], arrays: dict[str, Any]) -> Dataset:
    return check_dataset(
        names,
        {n: arrays.get(n) for n in names},
        arrays.get("y"),
        {n: arrays.get(_val_name(n)) for n in names},
        arrays.get("y_val"),
    )


def _load_pt_dict(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise _bad(f"dataset file not found: {path}")
    if zipfile.is_zipfile(path):
        refuse_unsafe_zip(path, "invalid_dataset", "the .pt dataset")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _bad(f"cannot read dataset as a torch.save'd dict of tensors (weights_only): {_first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise _bad(f"a .pt dataset must hold a dict of tensors, got {type(obj).__name__}")
    return obj


@dataset_formats.register("pt")
class PtDataset(_Format):
    """A ``torch.save``'d dict of tensors (same keys as npz), loaded with ``weights_only=True``."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        import torch

        obj = _load_pt_dict(path)
        names = list(inputs)
        _require(names, {str(k) for k in obj})
        arrays = {}
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise _bad(f"entry {key!r} is a {type(value).__name__}, expected a tensor")
            if value.dtype == torch.bfloat16:
                value = value.float()
            arrays[str(key)] = value.detach().cpu().numpy()
        return _from_arrays(names, arrays)


def _table_to_dataset(columns: dict[str, np.ndarray], inputs: tuple[str, ...], options: dict,
                      non_numeric: list[str]) -> Dataset:
    label = options.get("label_column")
    if label is not None and label not in columns and label not in non_numeric:
        raise _bad(f"label column {label!r} not found (columns: {', '.join(list(columns) + non_numeric)})")
    bad = [c for c in non_numeric if c != label]
    if bad:
        raise _bad(f"column {bad[0]!r} is not numeric; every feature column must be numeric "
                   f"(set options.label_column if it holds the labels)")
    if label in non_numeric:
        raise _bad(f"label column {label!r} is not numeric")
    features = [c for c in columns if c != label]
    if not features:
        raise _bad("the table has no feature columns")
    if len(inputs) != 1:
        raise _bad(f"a {'csv/parquet'} table has one input (all feature columns); got inputs {list(inputs)}")
    x = np.stack([columns[c].astype(np.float32) for c in features], axis=1)
    y = columns[label] if label is not None else None
    ds = check_dataset([inputs[0]], {inputs[0]: x}, y, None, None)
    ds.notes["feature_columns"] = features
    return ds


def _parse_number_column(values: list[str]) -> np.ndarray | None:
    try:
        return np.array([float(v) if v.strip() != "" else math.nan for v in values], dtype=np.float64)
    except ValueError:
        return None


@dataset_formats.register("csv")
class CsvDataset(_Format):
    """CSV with a header row; ``options.label_column`` names the labels, every other column is a feature."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        header, cols = _read_csv(path)
        columns, non_numeric = {}, []
        for name, values in zip(header, cols):
            arr = _parse_number_column(values)
            if arr is None:
                non_numeric.append(name)
            else:
                columns[name] = arr
        return _table_to_dataset(columns, inputs, options, non_numeric)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    import csv

    if not path.is_file():
        raise _bad(f"dataset file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise _bad("the CSV file is empty (expected a header row)")
            header = [h.strip() for h in header]
            if len(set(header)) != len(header):
                raise _bad("the CSV header names a column twice")
            cols: list[list[str]] = [[] for _ in header]
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise _bad(f"CSV line {lineno} has {len(row)} fields, the header has {len(header)}")
                for c, v in zip(cols, row):
                    c.append(v)
    except UnicodeDecodeError:
        raise _bad("the CSV file is not UTF-8 text") from None
    except csv.Error as exc:
        raise _bad(f"cannot parse CSV: {_first_line(exc)}") from None
    if not cols[0]:
        raise _bad("the CSV file has a header but no rows")
    return header, cols


@dataset_formats.register("parquet")
class ParquetDataset(_Format):
    """Parquet table; ``options.label_column`` names the labels, every other column is a numeric feature."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not path.is_file():
            raise _bad(f"dataset file not found: {path}")
        try:
            table = pq.read_table(str(path))
        except Exception as exc:
            raise _bad(f"cannot read dataset as parquet: {_first_line(exc)}") from None
        columns, non_numeric = {}, []
        for name, col in zip(table.column_names, table.columns):
            t = col.type
            if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                arr = col.to_numpy(zero_copy_only=False)
                columns[name] = np.asarray(arr, dtype=np.float64)
            else:
                non_numeric.append(name)
        if table.num_rows == 0:
            raise _bad("the parquet table has no rows")
        return _table_to_dataset(columns, inputs, options, non_numeric)


def image_options(options: dict) -> tuple[tuple[int, int], bool, str]:
    size = options.get("image_size", [32, 32])
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 4096 for s in size)):
        raise _bad(f"options.image_size must be [height, width] with 1..4096 pixels each, got {size!r}")
    gray = options.get("grayscale", False)
    if not isinstance(gray, bool):
        raise _bad(f"options.grayscale must be a boolean, got {gray!r}")
    norm = options.get("normalize", "none")
    if norm not in ("none", "dataset", "imagenet"):
        raise _bad(f"options.normalize must be 'none', 'dataset' or 'imagenet', got {norm!r}")
    return (int(size[0]), int(size[1])), gray, norm


def list_image_zip(path: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """``({"train"|"val": [(member, class_name)]}, classes)`` of an image-folder zip."""
    if not path.is_file():
        raise _bad(f"dataset file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise _bad("cannot read image folder as a zip archive: File is not a zip file")
    infos = refuse_unsafe_zip(path, "invalid_dataset", "the image folder")
    images = [i for i in infos if not i.is_dir() and i.filename.lower().endswith(IMAGE_SUFFIXES)
              and "__MACOSX" not in i.filename and not Path(i.filename).name.startswith(".")]
    for info in images:
        if info.file_size > MAX_IMAGE_BYTES:
            raise _bad(f"image {info.filename!r} is {info.file_size} bytes, more than the limit of "
                       f"{MAX_IMAGE_BYTES} bytes per image")
    files = [i.filename for i in images]
    if not files:
        raise _bad("the zip holds no images (expected <class>/<image>.png|jpg)")
    parts = [n.split("/") for n in files]
    # Strip one common top-level folder ("digits/0/a.png").
    while all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    if any(len(p) not in (2, 3) for p in parts):
        raise _bad("images must be laid out as <class>/<image> (optionally under train/ and val/)")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    tops = {p[0] for p in parts}
    three = all(len(p) == 3 for p in parts)
    if three and tops <= {"train", "val", "test"} and "train" in tops:
        for member, p in zip(files, parts):
            splits["train" if p[0] == "train" else "val"].append((member, p[1]))
    elif all(len(p) == 2 for p in parts):
        splits["train"] = [(member, p[0]) for member, p in zip(files, parts)]
    else:
        raise _bad("images must be laid out as <class>/<image> (optionally under train/ and val/)")
    classes = sorted({c for lst in splits.values() for _, c in lst})
    for lst in splits.values():
        lst.sort()
    return splits, classes


def check_image_pixels(img: Any, member: str) -> None:
    """Refuse an opened (not yet decoded) PIL image with more than MAX_IMAGE_PIXELS pixels."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _bad(f"image {member!r} declares {width}×{height} pixels, more than the limit of "
                   f"{MAX_IMAGE_PIXELS} pixels per image")


@dataset_formats.register("image_folder")
class ImageFolderDataset(_Format):
    """A zip of ``<class>/<image>``; labels are the sorted class names; images float32 N×C×H×W."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        from PIL import Image

        size, gray, norm = image_options(options)
        splits, classes = list_image_zip(path)
        index = {c: i for i, c in enumerate(classes)}
        channels = 1 if gray else 3

        def decode(zf: zipfile.ZipFile, items: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
            x = np.empty((len(items), channels, size[0], size[1]), dtype=np.float32)
            y = np.empty(len(items), dtype=np.int64)
            for i, (member, cls) in enumerate(items):
                try:
                    with Image.open(io.BytesIO(zf.read(member))) as img:
                        check_image_pixels(img, member)  # before decoding: the header alone gives the size
                        img = img.convert("L" if gray else "RGB")
                        if img.size != (size[1], size[0]):
                            img = img.resize((size[1], size[0]), Image.BILINEAR)
                        a = np.asarray(img, dtype=np.float32) / 255.0
                except EngineError:
                    raise
                except Exception as exc:
                    raise _bad(f"cannot decode image {member!r}: {_first_line(exc)}") from None
                x[i] = a[None] if gray else a.transpose(2, 0, 1)
                y[i] = index[cls]
            return x, y

        if len(inputs) != 1:
            raise _bad(f"an image folder has one input (the images); got inputs {list(inputs)}")
        with zipfile.ZipFile(path) as zf:
            x, y = decode(zf, splits["train"])
            val = decode(zf, splits["val"]) if splits["val"] else None
        if norm != "none":
            if norm == "dataset":
                mean = x.mean(axis=(0, 2, 3))
                std = x.std(axis=(0, 2, 3)) + 1e-6
            else:
                mean = np.array(IMAGENET_MEAN if not gray else [float(np.mean(IMAGENET_MEAN))], dtype=np.float32)
                std = np.array(IMAGENET_STD if not gray else [float(np.mean(IMAGENET_STD))], dtype=np.float32)
            shape = (1, channels, 1, 1)
            x = (x - mean.reshape(shape)) / std.reshape(shape)
            if val is not None:
                val = ((val[0] - mean.reshape(shape)) / std.reshape(shape), val[1])
        name = inputs[0]
        ds = check_dataset([name], {name: x}, y, {name: None if val is None else val[0]},
                           None if val is None else val[1])
        ds.classes = classes
        return ds


def load_dataset(source: DatasetSource, cache_dir: Path | None = None) -> Dataset:
    if source.format not in dataset_formats:
        raise EngineError(
            "unsupported", f"dataset format {source.format!r} is not supported ({', '.join(dataset_formats.names())})"
        )
    inputs = tuple(check_input_name(n) for n in source.inputs) or ("x",)
    if len(set(inputs)) != len(inputs):
        raise _bad(f"dataset inputs name an array twice: {list(inputs)}")
    options = dict(getattr(source, "options", None) or {})
    loader = dataset_formats.get(source.format)(None)
    return loader.load(Path(source.path), inputs, options, cache_dir)


def _take(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for k, a in arrays.items():
        if isinstance(a, np.memmap):
            out[k] = _IndexedMemmap.of(a, idx)
        else:
            out[k] = a[idx]
    return out


class _IndexedMemmap:
    """A lazy row subset of a memory-mapped array (``arr[index]`` read only when batches are taken)."""

    def __init__(self, base: np.ndarray, index: np.ndarray):
        self.base, self.index = base, index
        self.shape = (len(index),) + tuple(base.shape[1:])
        self.dtype = base.dtype
        self.ndim = base.ndim

    @classmethod
    def of(cls, a: Any, idx: np.ndarray) -> _IndexedMemmap:
        if isinstance(a, _IndexedMemmap):
            return cls(a.base, a.index[idx])
        return cls(a, np.asarray(idx))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        rows = self.index[idx]
        if isinstance(rows, np.ndarray):
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
            out[order] = self.base[rows[order]]
            return out
        return np.asarray(self.base[rows])


def is_lazy(a: Any) -> bool:
    return isinstance(a, (np.memmap, _IndexedMemmap))


def split_dataset(dataset: Dataset, val_fraction: float, seed: int) -> Split:
    """Held-out rows: ``x_val``/``y_val`` if given, else a seeded random subset.

    The subset is ``round(N * val_fraction)`` rows, at least 1 and at most N-1,
    chosen by a permutation from ``np.random.default_rng(seed)`` so the same
    seed always holds out the same rows.
    """
    if dataset.x_val is not None:
        return Split(dataset.x, dataset.y, dataset.x_val, dataset.y_val, "x_val")
    n = dataset.num_rows
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    y = dataset.y
    return Split(
        _take(dataset.x, train_idx),
        None if y is None else y[train_idx],
        _take(dataset.x, val_idx),
        None if y is None else y[val_idx],
        "split",
    )
