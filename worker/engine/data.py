"""Dataset loading, checking and the train/held-out split.

Input: a :class:`DatasetSource` (an ``.npz`` file). Output: a :class:`Dataset`
of numpy arrays:

* ``x``: float32 [N, *row_shape] (any numeric dtype is accepted and converted)
* ``y``: int64 [N] class ids, or None (unlabelled: pure soft-target KD)
* ``x_val`` / ``y_val``: optional explicit held-out arrays, same layout

Every problem is an ``EngineError("invalid_dataset", ...)`` naming the array.
Nothing is ever unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .registry import EmptyConfig, dataset_formats
from .types import DatasetSource, EngineError


@dataclass
class Dataset:
    input_name: str
    x: np.ndarray
    y: np.ndarray | None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclass
class Split:
    """Arrays actually used for training and held-out evaluation."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray
    y_val: np.ndarray | None
    val_source: str  # "x_val" (explicit held-out arrays) or "split" (carved from x)


def _bad(message: str) -> EngineError:
    return EngineError("invalid_dataset", message)


@dataset_formats.register("npz")
class NpzDataset:
    """numpy ``.npz`` archive (``np.savez`` / ``np.savez_compressed``)."""

    Config = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None):
        self.config = config

    def load(self, path: Path, inputs: tuple[str, ...]) -> Dataset:
        if len(inputs) != 1:
            raise EngineError("unsupported", f"only single-input datasets are supported; got inputs {list(inputs)}")
        name = inputs[0]
        if not path.is_file():
            raise _bad(f"dataset file not found: {path}")
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
                if name not in present:
                    raise _bad(f"dataset has no array {name!r} (found: {', '.join(sorted(present)) or 'none'})")

                def read(key: str) -> np.ndarray | None:
                    if key not in present:
                        return None
                    try:
                        return archive[key]
                    except ValueError as exc:  # object arrays need pickle: refuse
                        raise _bad(f"array {key!r} cannot be read without pickle: {_first_line(exc)}") from None
                    except (OSError, zipfile.BadZipFile, EOFError) as exc:
                        raise _bad(f"array {key!r} is corrupt: {_first_line(exc)}") from None

                val_name = f"{name}_val"
                return check_dataset(name, read(name), read("y"), read(val_name), read("y_val"), val_name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


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
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise _bad(f"array {name!r} contains NaN or infinite values")
    return np.ascontiguousarray(x)


def _check_labels(name: str, y: np.ndarray, rows: int, x_name: str) -> np.ndarray:
    if y.ndim != 1:
        raise _bad(f"array {name!r} must be 1-D class ids, got shape {list(y.shape)}")
    if len(y) != rows:
        raise _bad(f"array {name!r} has {len(y)} rows but {x_name!r} has {rows}")
    if np.issubdtype(y.dtype, np.floating):
        # Labels saved as floats are common; accept them only if integral.
        if not np.isfinite(y).all() or not np.all(np.mod(y, 1) == 0):
            raise _bad(f"array {name!r} must hold integer class ids, got non-integer {y.dtype} values")
    elif not np.issubdtype(y.dtype, np.integer) and y.dtype != bool:
        raise _bad(f"array {name!r} must hold integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise _bad(f"array {name!r} contains negative class id {int(y.min())}")
    return y


def check_dataset(
    name: str,
    x: np.ndarray | None,
    y: np.ndarray | None,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    val_name: str = "x_val",
) -> Dataset:
    """Validate raw arrays and normalise dtypes (x -> float32, y -> int64)."""
    if x is None:
        raise _bad(f"dataset has no array {name!r}")
    x = _check_inputs(name, x)
    if y is not None:
        y = _check_labels("y", y, x.shape[0], name)
    if y_val is not None and x_val is None:
        raise _bad(f"dataset has 'y_val' but no {val_name!r}")
    if x_val is not None:
        x_val = _check_inputs(val_name, x_val)
        if x_val.shape[1:] != x.shape[1:]:
            raise _bad(
                f"array {val_name!r} has per-row shape {list(x_val.shape[1:])} "
                f"but {name!r} has {list(x.shape[1:])}"
            )
        if y_val is not None:
            y_val = _check_labels("y_val", y_val, x_val.shape[0], val_name)
        if (y is None) != (y_val is None):
            raise _bad(
                f"labels must be given for both training and held-out rows: "
                f"'y' is {'present' if y is not None else 'absent'}, "
                f"'y_val' is {'present' if y_val is not None else 'absent'}"
            )
    elif x.shape[0] < 2:
        raise _bad(f"array {name!r} needs at least 2 rows to hold one out for evaluation, got {x.shape[0]}")
    return Dataset(name, x, y, x_val, y_val)


def check_label_range(dataset: Dataset, num_classes: int) -> None:
    """Class ids must index the teacher's outputs: 0 <= y < num_classes."""
    for key, y in (("y", dataset.y), ("y_val", dataset.y_val)):
        if y is not None and len(y) and int(y.max()) >= num_classes:
            raise _bad(
                f"array {key!r} contains class id {int(y.max())} but the teacher has {num_classes} outputs "
                f"(valid class ids are 0..{num_classes - 1})"
            )


def load_dataset(source: DatasetSource) -> Dataset:
    if source.format not in dataset_formats:
        raise EngineError(
            "unsupported", f"dataset format {source.format!r} is not supported ({', '.join(dataset_formats.names())})"
        )
    loader = dataset_formats.get(source.format)(None)
    return loader.load(Path(source.path), tuple(source.inputs))


def split_dataset(dataset: Dataset, val_fraction: float, seed: int) -> Split:
    """Held-out rows: ``x_val``/``y_val`` if given, else a seeded random subset.

    The subset is ``round(N * val_fraction)`` rows, at least 1 and at most N-1,
    chosen by a permutation from ``np.random.default_rng(seed)`` so the same
    seed always holds out the same rows.
    """
    if dataset.x_val is not None:
        return Split(dataset.x, dataset.y, dataset.x_val, dataset.y_val, "x_val")
    n = dataset.x.shape[0]
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    y = dataset.y
    return Split(
        dataset.x[train_idx],
        None if y is None else y[train_idx],
        dataset.x[val_idx],
        None if y is None else y[val_idx],
        "split",
    )
