"""The ``pt`` dataset format: a ``torch.save``'d dict of tensors with the keys of an npz
(``<input>``, ``y``, ``<input>_val``, ``y_val``), loaded with ``weights_only=True`` (nothing is
unpickled beyond tensors); bfloat16 tensors become float32.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from engine.registry import dataset_formats
from engine.data.dataset import (
    Dataset,
    DatasetFormat,
    dataset_error,
    dataset_from_arrays,
    first_line,
    require_arrays,
)
from engine.inspection.zipcheck import refuse_unsafe_zip


def load_pt_dict(path: Path) -> dict[str, Any]:
    """The dict a ``torch.save``'d ``.pt`` file holds, loaded with ``weights_only=True`` (zip checked first)."""
    import torch

    if not path.is_file():
        raise dataset_error(f"dataset file not found: {path}")
    if zipfile.is_zipfile(path):
        refuse_unsafe_zip(path, "invalid_dataset", "the .pt dataset")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise dataset_error(f"cannot read dataset as a torch.save'd dict of tensors (weights_only): {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise dataset_error(f"a .pt dataset must hold a dict of tensors, got {type(obj).__name__}")
    return obj


@dataset_formats.register("pt")
class PtDataset(DatasetFormat):
    """A ``torch.save``'d dict of tensors (same keys as npz), loaded with ``weights_only=True``."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        import torch

        obj = load_pt_dict(path)
        names = list(inputs)
        require_arrays(names, {str(k) for k in obj})
        arrays = {}
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise dataset_error(f"entry {key!r} is a {type(value).__name__}, expected a tensor")
            if value.dtype == torch.bfloat16:
                value = value.float()
            arrays[str(key)] = value.detach().cpu().numpy()
        return dataset_from_arrays(names, arrays)
