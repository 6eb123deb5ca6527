"""The dataset types and the checks every format shares.

* :class:`Dataset`: what a format's loader returns (numpy arrays, see the class).
* :class:`Split`: the rows actually used for training and held-out evaluation.
* :func:`check_dataset`: raw arrays in, a :class:`Dataset` with normalised dtypes out (float -> float32,
  integers -> int64, integral labels -> int64 class ids); every problem is
  ``InvalidDataset(...)`` naming the array.
* :class:`DatasetFormat`: the base class of the registered formats (``engine.data.npz``, ``.pt``,
  ``.tabular``, ``.image_folder``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError, InvalidDataset

#: Input names (array names, and file names in the npz cache): the API accepts nothing else either.
INPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass
class Dataset:
    """A checked dataset: ``x`` ``{input: [N, *row_shape]}`` in ``inputs`` order (float32, or int64 for
    token ids/masks; large npz members stay ``np.memmap``), ``y`` [N] int64 class ids or float32
    targets [N] / [N, D] or None, optional explicit held-out ``x_val`` / ``y_val`` of the same layout,
    ``classes`` (image_folder's sorted class names) and loader ``notes``."""

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


def dataset_error(message: str) -> EngineError:
    """``InvalidDataset(message)``."""
    return InvalidDataset(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 300 characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# checks shared by every format


def _check_inputs(name: str, x: np.ndarray) -> np.ndarray:
    numeric = np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)
    if not (numeric or x.dtype == bool):
        raise dataset_error(f"array {name!r} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise dataset_error(f"array {name!r} must have shape [rows, features...], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise dataset_error(f"array {name!r} has no rows")
    if any(d == 0 for d in x.shape[1:]):
        raise dataset_error(f"array {name!r} has an empty feature dimension: shape {list(x.shape)}")
    if isinstance(x, np.memmap):
        # Memory-mapped: converted per batch; not scanned whole (that is the point).
        return x
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.int64, copy=False)
        if len(x) and x.min() < 0:
            raise dataset_error(f"integer array {name!r} contains negative value {int(x.min())} (token ids must be >= 0)")
        return np.ascontiguousarray(x)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise dataset_error(f"array {name!r} contains NaN or infinite values")
    return np.ascontiguousarray(x)


def _check_labels(name: str, y: np.ndarray, rows: int, x_name: str) -> np.ndarray:
    if y.ndim not in (1, 2):
        raise dataset_error(f"array {name!r} must be 1-D class ids or [rows, outputs] targets, got shape {list(y.shape)}")
    if len(y) != rows:
        raise dataset_error(f"array {name!r} has {len(y)} rows but {x_name!r} has {rows}")
    numeric = np.issubdtype(y.dtype, np.number) or y.dtype == bool
    if not numeric or np.issubdtype(y.dtype, np.complexfloating):
        raise dataset_error(f"array {name!r} must be numeric, got dtype {y.dtype}")
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise dataset_error(f"array {name!r} contains NaN or infinite values")
        if y.ndim == 1 and np.all(np.mod(y, 1) == 0) and (len(y) == 0 or y.min() >= 0):
            return y.astype(np.int64)  # integral float labels: class ids (regression accepts them too)
        return y.astype(np.float32)
    if y.ndim == 2:
        return y.astype(np.float32)
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise dataset_error(f"array {name!r} contains negative class id {int(y.min())}")
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
            raise dataset_error(f"dataset has no array {name!r}")
        out[name] = _check_inputs(name, x[name])  # type: ignore[arg-type]
    first = inputs[0]
    rows = out[first].shape[0]
    for name in inputs[1:]:
        if out[name].shape[0] != rows:
            raise dataset_error(f"array {name!r} has {out[name].shape[0]} rows but {first!r} has {rows}")
    if y is not None:
        y = _check_labels("y", y, rows, first)
    val_names = {n: val_name(n) for n in inputs}
    vals = {n: v for n, v in (x_val or {}).items() if v is not None}
    if y_val is not None and not vals:
        raise dataset_error(f"dataset has 'y_val' but no {val_names[first]!r}")
    out_val: dict[str, np.ndarray] | None = None
    if vals:
        missing = [val_names[n] for n in inputs if n not in vals]
        if missing:
            raise dataset_error(f"dataset has held-out arrays for some inputs but not {', '.join(map(repr, missing))}")
        out_val = {}
        for name in inputs:
            v = _check_inputs(val_names[name], vals[name])
            if v.shape[1:] != out[name].shape[1:]:
                raise dataset_error(
                    f"array {val_names[name]!r} has per-row shape {list(v.shape[1:])} "
                    f"but {name!r} has {list(out[name].shape[1:])}"
                )
            out_val[name] = v
        vrows = out_val[first].shape[0]
        for name in inputs[1:]:
            if out_val[name].shape[0] != vrows:
                raise dataset_error(f"array {val_names[name]!r} has {out_val[name].shape[0]} rows but "
                           f"{val_names[first]!r} has {vrows}")
        if y_val is not None:
            y_val = _check_labels("y_val", y_val, vrows, val_names[first])
        if (y is None) != (y_val is None):
            raise dataset_error(
                f"labels must be given for both training and held-out rows: "
                f"'y' is {'present' if y is not None else 'absent'}, "
                f"'y_val' is {'present' if y_val is not None else 'absent'}"
            )
        if y is not None and y_val is not None and y.dtype != y_val.dtype:
            # one side integral, the other not: regression targets on both sides
            y, y_val = y.astype(np.float32), y_val.astype(np.float32)
    elif rows < 2:
        raise dataset_error(f"array {first!r} needs at least 2 rows to hold one out for evaluation, got {rows}")
    return Dataset(list(inputs), out, y, out_val, y_val)


def val_name(name: str) -> str:
    """The array name of an input's explicit held-out rows: ``x`` -> ``x_val``."""
    return f"{name}_val"


def check_label_range(dataset: Dataset, num_classes: int) -> None:
    """Class ids must index the teacher's outputs: 0 <= y < num_classes."""
    for key, y in (("y", dataset.y), ("y_val", dataset.y_val)):
        if y is None:
            continue
        if y.dtype != np.int64 or y.ndim != 1:
            raise dataset_error(f"array {key!r} holds non-integer values ({y.dtype}, shape {list(y.shape)}); "
                       "a classification teacher needs integer class ids")
        if len(y) and int(y.max()) >= num_classes:
            raise dataset_error(
                f"array {key!r} contains class id {int(y.max())} but the teacher has {num_classes} outputs "
                f"(valid class ids are 0..{num_classes - 1})"
            )


def check_input_name(name: str) -> str:
    """``name`` when it matches INPUT_NAME; else ``EngineError("invalid_dataset")``. Input names become
    array lookups and cache file names, so nothing that could name a path gets through."""
    if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
        raise dataset_error(f"input name {str(name)[:80]!r} is not allowed: input names are 1 to 64 letters, digits or "
                   f"underscores, not starting with a digit")
    return name


def require_arrays(names: list[str], present: set[str]) -> None:
    """Refuse (``invalid_dataset``) when an input array of ``names`` is not among the ``present`` names."""
    for name in names:
        if name not in present:
            raise dataset_error(f"dataset has no array {name!r} (found: {', '.join(sorted(present)) or 'none'})")


def dataset_from_arrays(names: list[str], arrays: dict[str, Any]) -> Dataset:
    """A checked :class:`Dataset` from named arrays laid out as in an npz: ``<input>``, ``y``,
    ``<input>_val``, ``y_val`` (the held-out ones optional)."""
    return check_dataset(
        names,
        {n: arrays.get(n) for n in names},
        arrays.get("y"),
        {n: arrays.get(val_name(n)) for n in names},
        arrays.get("y_val"),
    )


class DatasetFormat(ABC):
    """One dataset file format, registered in ``dataset_formats`` under its name (``npz``, ``csv``...).

    Built as ``cls(None)`` by :func:`engine.data.loading.load_dataset` (formats take no options of
    their own; per-file ``options`` come with each :meth:`load`).
    """

    def __init__(self, config: object = None):
        self.config = config

    @abstractmethod
    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        """Read the file into a :class:`Dataset` (inputs N×…, labels, held-out split when present)."""
