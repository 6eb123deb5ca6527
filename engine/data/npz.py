"""The ``npz`` dataset format: a numpy ``.npz`` archive (``np.savez`` / ``np.savez_compressed``).

Arrays named by the job's ``inputs`` (default ``x``) and ``y``; held-out ``<input>_val`` and ``y_val``.
The archive and every ``.npy`` header are checked before numpy reads anything (object arrays, which
need pickle, are refused); files over :data:`NPZ_MMAP_THRESHOLD` are unpacked to ``.npy`` files in the
job's cache and memory-mapped (``np.memmap``), never read whole.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from engine.registry import dataset_formats
from engine.data.dataset import (
    Dataset,
    DatasetFormat,
    dataset_error,
    dataset_from_arrays,
    first_line,
    require_arrays,
    val_name,
)
from engine.inspection.zipcheck import ENGINE_MAX_TOTAL_BYTES, refuse_unsafe_zip

#: npz files larger than this are memory-mapped (members extracted to .npy in a cache dir).
NPZ_MMAP_THRESHOLD = 512 * 1024 * 1024
_CACHE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: A .npy header longer than this is refused (numpy's own default bound).
MAX_NPY_HEADER = 10_000


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
        raise dataset_error(f"cannot read dataset as .npz: {first_line(exc)}") from None
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
            raise dataset_error(f"array {name!r} has no valid .npy header: {first_line(exc)}") from None
        header_bytes = f.tell()
    if dtype.hasobject:
        raise dataset_error(f"array {name!r} holds Python objects (needs pickle); save numeric arrays only")
    data_bytes = math.prod(shape) * dtype.itemsize
    if any(d < 0 for d in shape) or data_bytes > ENGINE_MAX_TOTAL_BYTES or data_bytes != info.file_size - header_bytes:
        raise dataset_error(f"array {name!r} declares shape {list(shape)} of {dtype} ({data_bytes} bytes) but its member "
                   f"holds {info.file_size - header_bytes} bytes after the header; the file is damaged or crafted")
    return tuple(int(d) for d in shape), dtype


def _cache_file(target: Path, key: str) -> Path:
    """``target/<key>.npy`` for a validated array name, resolved and checked to lie inside ``target``."""
    if not _CACHE_NAME.fullmatch(key):  # an input name, or one with "_val" appended
        raise dataset_error(f"array {key[:80]!r} cannot be unpacked: only letters, digits and underscores are allowed")
    root = target.resolve()
    dest = (root / f"{key}.npy").resolve()
    if dest.parent != root:
        raise dataset_error(f"array {key!r} would be unpacked outside the dataset cache")
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
                raise dataset_error(f"array {key!r} cannot be read without pickle: {first_line(exc)}") from None
            out[key] = arr
    return out


@dataset_formats.register("npz")
class NpzDataset(DatasetFormat):
    """numpy ``.npz`` archive (``np.savez`` / ``np.savez_compressed``); large files are memory-mapped."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        if not path.is_file():
            raise dataset_error(f"dataset file not found: {path}")
        names = list(inputs)
        wanted = names + [val_name(n) for n in names] + ["y", "y_val"]
        # Check the archive and every array header before numpy reads anything.
        present = set(npz_headers(path)) if zipfile.is_zipfile(path) else set()
        if cache_dir is not None and path.stat().st_size > NPZ_MMAP_THRESHOLD:
            require_arrays(names, present)
            arrays = _mmap_npz(path, [k for k in wanted if k in present], cache_dir)
            # labels are small: read them whole
            for k in ("y", "y_val"):
                if k in arrays:
                    arrays[k] = np.asarray(arrays[k])
            ds = dataset_from_arrays(names, arrays)
            ds.notes["memory_mapped"] = True
            return ds
        # Open the file ourselves: np.load leaks the handle when the zip is corrupt.
        with open(path, "rb") as fh:
            try:
                archive = np.load(fh, allow_pickle=False)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise dataset_error(f"cannot read dataset as .npz: {first_line(exc)}") from None
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise dataset_error("dataset is a single .npy array, expected an .npz archive with named arrays")
            with archive:
                present = set(archive.files)
                require_arrays(names, present)
                arrays = {}
                for key in wanted:
                    if key not in present:
                        continue
                    try:
                        arrays[key] = archive[key]
                    except ValueError as exc:  # object arrays need pickle: refuse
                        raise dataset_error(f"array {key!r} cannot be read without pickle: {first_line(exc)}") from None
                    except (OSError, zipfile.BadZipFile, EOFError) as exc:
                        raise dataset_error(f"array {key!r} is corrupt: {first_line(exc)}") from None
        return dataset_from_arrays(names, arrays)
