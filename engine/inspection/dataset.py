"""Fast structural check of a dataset file (run by the API in a subprocess).

CLI (one JSON line on stdout; exit 0 on success, 2 on failure)::

    python -m engine.inspection.dataset --format npz|pt|csv|parquet|image_folder \
        [--options JSON] [--inputs a,b] PATH

success: ``{"ok": true, "format", "num_rows", "has_labels",
"schema": {"inputs": [...], "arrays": {name: {"shape": [...], "dtype": str}}, "classes"?: [...]}}``
(``shape`` includes the row count first; ``num_rows`` counts training rows, held-out
``*_val`` arrays are listed in ``arrays``); failure: ``{"ok": false, "error": "..."}``.

Reads only what is needed: npz array headers (no array data), parquet metadata,
zip listings (image_folder decodes one image). CSV is parsed (type checks need every value).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from engine.errors import EngineError, InvalidDataset
from jobspec.base import DATASET_FORMATS

FORMATS = DATASET_FORMATS  # the spec's list: one definition


def _npz_headers(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "dtype"}}`` from the array headers, after the archive and header checks of
    :func:`.data.npz_headers` (the same ones the job's loader applies)."""
    from engine.data.npz import npz_headers

    if not zipfile.is_zipfile(path):
        raise InvalidDataset("cannot read dataset as .npz: File is not a zip file")
    return {name: {"shape": list(shape), "dtype": str(dtype)} for name, (shape, dtype) in npz_headers(path).items()}


def _check_arrays(arrays: dict[str, dict[str, Any]], inputs: list[str]) -> dict[str, Any]:
    for name in inputs:
        if name not in arrays:
            raise InvalidDataset(f"dataset has no array {name!r} (found: {', '.join(sorted(arrays)) or 'none'})")
        if len(arrays[name]["shape"]) < 2:
            raise InvalidDataset(f"array {name!r} must have shape [rows, features...], got {arrays[name]['shape']}")
    rows = arrays[inputs[0]]["shape"][0]
    for name in inputs[1:]:
        if arrays[name]["shape"][0] != rows:
            raise InvalidDataset(f"array {name!r} has {arrays[name]['shape'][0]} rows "
                              f"but {inputs[0]!r} has {rows}")
    if "y" in arrays and arrays["y"]["shape"][:1] != [rows]:
        raise InvalidDataset(f"array 'y' has {arrays['y']['shape'][:1]} rows but "
                          f"{inputs[0]!r} has {rows}")
    keep = set(inputs) | {f"{n}_val" for n in inputs} | {"y", "y_val"}
    return {"num_rows": int(rows), "has_labels": "y" in arrays,
            "schema": {"inputs": inputs, "arrays": {k: v for k, v in arrays.items() if k in keep}}}


def inspect_dataset(path: Path, format: str, options: dict | None = None,
                    inputs: list[str] | None = None) -> dict[str, Any]:
    """Check that ``path`` is a usable dataset of ``format``; never raises."""
    path = Path(path)
    options = options or {}
    inputs = list(inputs or ["x"])
    from engine.data.dataset import check_input_name

    try:
        for name in inputs:
            check_input_name(name)
    except EngineError as exc:
        return {"ok": False, "error": exc.message}
    if format not in FORMATS:
        return {"ok": False, "error": f"unsupported dataset format {format!r} (expected one of: {', '.join(FORMATS)})"}
    if not path.is_file():
        return {"ok": False, "error": f"file not found: {path}"}
    if path.stat().st_size == 0:
        return {"ok": False, "error": "the file is empty"}
    try:
        return {"ok": True, "format": format, **_inspect(path, format, options, inputs)}
    except EngineError as exc:
        return {"ok": False, "error": exc.message}
    except Exception as exc:  # never let a hostile file crash the caller
        return {"ok": False, "error": f"cannot inspect {format} dataset: {type(exc).__name__}: {str(exc)[:300]}"}


def _inspect(path: Path, format: str, options: dict, inputs: list[str]) -> dict[str, Any]:
    if format == "jsonl":
        from engine.lm.text_data import describe

        return describe(path)
    if format == "npz":
        return _check_arrays(_npz_headers(path), inputs)
    if format == "pt":
        import torch

        from engine.data.pt import load_pt_dict

        obj = load_pt_dict(path)
        arrays = {str(k): {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                  for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return _check_arrays(arrays, inputs)
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(str(path))
        except Exception as exc:
            raise InvalidDataset(f"cannot read dataset as parquet: {str(exc)[:300]}") from None
        schema = pf.schema_arrow
        label = options.get("label_column")
        names = list(schema.names)
        if label is not None and label not in names:
            raise InvalidDataset(f"label column {label!r} not found (columns: {', '.join(names)})")
        for f in schema:
            numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)
            if not numeric:
                raise InvalidDataset(f"column {f.name!r} is not numeric ({f.type})")
        rows = pf.metadata.num_rows
        feats = [n for n in names if n != label]
        arrays = {inputs[0]: {"shape": [rows, len(feats)], "dtype": "float32"}}
        if label is not None:
            arrays["y"] = {"shape": [rows], "dtype": str(schema.field(label).type)}
        return {"num_rows": rows, "has_labels": label is not None,
                "schema": {"inputs": inputs[:1], "arrays": arrays, "feature_columns": feats}}
    if format == "csv":
        from engine.data.loading import load_dataset
        from engine.values import DatasetSource

        ds = load_dataset(DatasetSource(path, "csv", inputs=tuple(inputs[:1]), options=options))
        arrays = {inputs[0]: {"shape": list(ds.x[inputs[0]].shape), "dtype": "float32"}}
        if ds.y is not None:
            arrays["y"] = {"shape": list(ds.y.shape), "dtype": str(ds.y.dtype)}
        return {"num_rows": ds.num_rows, "has_labels": ds.y is not None,
                "schema": {"inputs": inputs[:1], "arrays": arrays, "feature_columns": ds.notes["feature_columns"]}}
    # image_folder
    from PIL import Image

    from engine.data.image_folder import check_image_pixels, image_options, list_image_zip

    size, gray, _ = image_options(options)
    splits, classes = list_image_zip(path)
    with zipfile.ZipFile(path) as zf:  # decode one image: catch non-images early
        member = splits["train"][0][0]
        try:
            with Image.open(zf.open(member)) as img:
                check_image_pixels(img, member)
                img.verify()
        except EngineError:
            raise
        except Exception as exc:
            raise InvalidDataset(f"cannot decode image {member!r}: {str(exc)[:200]}") from None
    c = 1 if gray else 3
    n = len(splits["train"])
    arrays = {inputs[0]: {"shape": [n, c, size[0], size[1]], "dtype": "float32"}, "y": {"shape": [n], "dtype": "int64"}}
    if splits["val"]:
        nv = len(splits["val"])
        arrays[f"{inputs[0]}_val"] = {"shape": [nv, c, size[0], size[1]], "dtype": "float32"}
        arrays["y_val"] = {"shape": [nv], "dtype": "int64"}
    return {"num_rows": n, "has_labels": True, "schema": {"inputs": inputs[:1], "arrays": arrays, "classes": classes}}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(json.dumps({"ok": False, "error": f"usage: {message}"}))
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m engine.inspection.dataset", description="Inspect a dataset file.")
    parser.add_argument("--format", required=True, help=" | ".join(FORMATS))
    parser.add_argument("--options", default=None, help="JSON object of format options")
    parser.add_argument("--inputs", default=None, help="comma-separated input array names (default: x)")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options) if args.options else {}
        if not isinstance(options, dict):
            raise ValueError("must be a JSON object")
    except ValueError as exc:
        print(json.dumps({"ok": False, "error": f"--options: {exc}"}))
        return 2
    inputs = [s.strip() for s in args.inputs.split(",") if s.strip()] if args.inputs else None
    with contextlib.redirect_stdout(sys.stderr):
        result = inspect_dataset(args.path, args.format, options, inputs)
    print(json.dumps(result))
    return 0 if result.get("ok") else 2


if __name__ == "__main__":
    sys.exit(main())
