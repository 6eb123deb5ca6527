"""Dataset loading: :func:`load_dataset` picks the registered format (registry ``dataset_formats``).

Input: a :class:`DatasetSource`. Output: a :class:`Dataset` of numpy arrays:

* ``x``: ``{input_name: array [N, *row_shape]}`` in ``inputs`` order; float inputs are
  float32, integer inputs (token ids, masks) int64. Large ``.npz`` members are
  memory-mapped (``np.memmap``), never read whole.
* ``y``: labels [N] (int64 class ids when integral, else float32 regression
  targets, possibly [N, D]) or None (unlabelled)
* ``x_val`` / ``y_val``: optional explicit held-out arrays, same layout
* ``classes``: class names for ``image_folder``

Formats and their files (one module each):

* ``npz`` (:mod:`engine.data.npz`): arrays named by ``inputs`` (default ``x``), ``y``; held-out ``<input>_val``, ``y_val``.
* ``pt`` (:mod:`engine.data.pt`): a ``torch.save``'d dict of tensors with the same keys (loaded with ``weights_only=True``).
* ``csv`` / ``parquet`` (:mod:`engine.data.tabular`): one row per example; ``options.label_column`` names the label
  column (optional); every other column is a numeric feature of the single input.
* ``image_folder`` (:mod:`engine.data.image_folder`): a zip of ``<class>/<image>.png|jpg`` (or ``train/<class>/...`` and
  ``val/<class>/...``); options ``image_size`` [H, W] (default [32, 32]), ``grayscale``
  (default false), ``normalize`` ``"none"`` (default) | ``"dataset"`` | ``"imagenet"``.

The types and shared checks are in :mod:`engine.data.dataset`, the train/held-out split in
:mod:`engine.data.split`. Every problem is an ``InvalidDataset(...)`` naming the array/column.
Nothing is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

from engine.registry import dataset_formats
from engine.values import DatasetSource
from engine.errors import Unsupported
from engine.data.dataset import Dataset, check_input_name, dataset_error
# importing the format modules registers them
from engine.data import image_folder, npz, pt, tabular  # noqa: F401


def load_dataset(source: DatasetSource, cache_dir: Path | None = None) -> Dataset:
    """The checked :class:`Dataset` in ``source`` (its ``path``, ``format``, ``inputs``, ``options``).

    ``cache_dir`` is where large npz members are unpacked for memory-mapping (None: never mapped).
    Unknown format -> ``EngineError("unsupported")``; a bad file -> ``EngineError("invalid_dataset")``.
    """
    if source.format not in dataset_formats:
        raise Unsupported(f"dataset format {source.format!r} is not supported ({', '.join(dataset_formats.names())})"
        )
    inputs = tuple(check_input_name(n) for n in source.inputs) or ("x",)
    if len(set(inputs)) != len(inputs):
        raise dataset_error(f"dataset inputs name an array twice: {list(inputs)}")
    options = dict(getattr(source, "options", None) or {})
    loader = dataset_formats.get(source.format)(None)
    return loader.load(Path(source.path), inputs, options, cache_dir)
