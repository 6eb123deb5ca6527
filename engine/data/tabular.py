"""The ``csv`` and ``parquet`` dataset formats: one row per example.

``options.label_column`` names the label column (optional); every other column is a numeric
feature of the single input, stacked into float32 [N, F] in column order (``notes["feature_columns"]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from engine.registry import dataset_formats
from engine.data.dataset import Dataset, DatasetFormat, check_dataset, dataset_error, first_line


def _table_to_dataset(columns: dict[str, np.ndarray], inputs: tuple[str, ...], options: dict,
                      non_numeric: list[str]) -> Dataset:
    label = options.get("label_column")
    if label is not None and label not in columns and label not in non_numeric:
        raise dataset_error(f"label column {label!r} not found (columns: {', '.join(list(columns) + non_numeric)})")
    bad = [c for c in non_numeric if c != label]
    if bad:
        raise dataset_error(f"column {bad[0]!r} is not numeric; every feature column must be numeric "
                   f"(set options.label_column if it holds the labels)")
    if label in non_numeric:
        raise dataset_error(f"label column {label!r} is not numeric")
    features = [c for c in columns if c != label]
    if not features:
        raise dataset_error("the table has no feature columns")
    if len(inputs) != 1:
        raise dataset_error(f"a {'csv/parquet'} table has one input (all feature columns); got inputs {list(inputs)}")
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
class CsvDataset(DatasetFormat):
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
        raise dataset_error(f"dataset file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise dataset_error("the CSV file is empty (expected a header row)")
            header = [h.strip() for h in header]
            if len(set(header)) != len(header):
                raise dataset_error("the CSV header names a column twice")
            cols: list[list[str]] = [[] for _ in header]
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise dataset_error(f"CSV line {lineno} has {len(row)} fields, the header has {len(header)}")
                for c, v in zip(cols, row):
                    c.append(v)
    except UnicodeDecodeError:
        raise dataset_error("the CSV file is not UTF-8 text") from None
    except csv.Error as exc:
        raise dataset_error(f"cannot parse CSV: {first_line(exc)}") from None
    if not cols[0]:
        raise dataset_error("the CSV file has a header but no rows")
    return header, cols


@dataset_formats.register("parquet")
class ParquetDataset(DatasetFormat):
    """Parquet table; ``options.label_column`` names the labels, every other column is a numeric feature."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not path.is_file():
            raise dataset_error(f"dataset file not found: {path}")
        try:
            table = pq.read_table(str(path))
        except Exception as exc:
            raise dataset_error(f"cannot read dataset as parquet: {first_line(exc)}") from None
        columns, non_numeric = {}, []
        for name, col in zip(table.column_names, table.columns):
            t = col.type
            if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                arr = col.to_numpy(zero_copy_only=False)
                columns[name] = np.asarray(arr, dtype=np.float64)
            else:
                non_numeric.append(name)
        if table.num_rows == 0:
            raise dataset_error("the parquet table has no rows")
        return _table_to_dataset(columns, inputs, options, non_numeric)
