"""The train/held-out split of a :class:`~engine.data.dataset.Dataset`, and lazy row subsets.

:func:`split_dataset` returns a :class:`~engine.data.dataset.Split`; rows of memory-mapped arrays are
taken lazily (:class:`IndexedMemmap`), read only when a batch is indexed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.data.dataset import Dataset, Split


def take_rows(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """``{name: array[idx]}``; memory-mapped arrays become lazy :class:`IndexedMemmap` subsets."""
    out = {}
    for k, a in arrays.items():
        if isinstance(a, np.memmap):
            out[k] = IndexedMemmap.of(a, idx)
        else:
            out[k] = a[idx]
    return out


class IndexedMemmap:
    """A lazy row subset of a memory-mapped array (``arr[index]`` read only when batches are taken)."""

    def __init__(self, base: np.ndarray, index: np.ndarray):
        self.base, self.index = base, index
        self.shape = (len(index),) + tuple(base.shape[1:])
        self.dtype = base.dtype
        self.ndim = base.ndim

    @classmethod
    def of(cls, a: Any, idx: np.ndarray) -> IndexedMemmap:
        if isinstance(a, IndexedMemmap):
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
    """Whether ``a`` is read from disk on indexing (a memmap or a lazy subset of one)."""
    return isinstance(a, (np.memmap, IndexedMemmap))


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
        take_rows(dataset.x, train_idx),
        None if y is None else y[train_idx],
        take_rows(dataset.x, val_idx),
        None if y is None else y[val_idx],
        "split",
    )
