"""The cache of teacher targets computed once over fixed data (:class:`TeacherCache`): in memory, or memory-mapped
files when large. Re-exported from :mod:`engine.lm.divergence`, so ``divergence.TeacherCache`` keeps working."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from engine.errors import InvalidModel, InvalidSpec, ShapeMismatch
from engine.lm.topk import TopK

#: Log-prob storage of :class:`TeacherCache`.
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}


class TeacherCache:
    """Teacher targets for N fixed sequences of length T, kept in memory, or memory-mapped files under
    `directory` when larger than `memory_limit_bytes`. Stores TopK as (float16 or float32 logprobs, int32 indices)
    or full log-probs as float16 [N, T, V]. put(rows: LongTensor [b], targets) and get(rows) -> targets
    (float32 logprobs / int64 indices on return). Report bytes used (:attr:`nbytes`).

    Precision. Log-probs are stored as float16 by default (``logprob_dtype="float32"`` to keep them exact): a
    float16 log-prob ℓ carries a relative error ≤ 2⁻¹¹, so p = e^ℓ has a relative error ≤ |ℓ|·4.9e-4 and an
    absolute one ≤ p|ℓ|·4.9e-4 ≤ 1.8e-4 (p|log p| ≤ 1/e) — below what KD can resolve, and the tokens whose
    log-probs are coarse (|ℓ| large) carry almost no mass. It halves the cache (top-k: 6 instead of 8 bytes per
    kept token). The tail mass computed from rounded log-probs can come out slightly negative: :class:`TopK`'s
    ``tail_mass`` and :func:`~engine.lm.divergence.token_divergence` clamp it. Token ids are int32 (vocabularies
    < 2³¹; uint16 would not hold 150k-token vocabularies). Memory-mapped files live in a fresh folder under
    ``directory``, removed by :meth:`close`.
    """

    def __init__(self, n: int, seq_len: int, *, vocab: int, top_k: int | None, directory: Path,
                 memory_limit_bytes: int = 256 << 20, logprob_dtype: str = "float16"):
        if logprob_dtype not in CACHE_DTYPES:
            raise InvalidSpec(f"logprob_dtype must be one of {', '.join(CACHE_DTYPES)}, got {logprob_dtype!r}")
        self.n, self.seq_len, self.vocab = int(n), int(seq_len), int(vocab)
        self.top_k = None if top_k is None or top_k >= vocab else int(top_k)
        self.dtype = CACHE_DTYPES[logprob_dtype]
        size = self.estimate_bytes(n, seq_len, vocab=vocab, top_k=top_k, logprob_dtype=logprob_dtype)
        self.on_disk = size > memory_limit_bytes
        self._folder: Path | None = None
        if self.on_disk:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="teacher-cache-", dir=directory))
        width = self.vocab if self.top_k is None else self.top_k
        self.logprobs = self._alloc("logprobs", self.dtype, width)
        self.indices = None if self.top_k is None else self._alloc("indices", np.int32, width)
        self.written = np.zeros(self.n, dtype=bool)

    @staticmethod
    def estimate_bytes(n: int, seq_len: int, *, vocab: int, top_k: int | None, logprob_dtype: str = "float16") -> int:
        """Bytes the cache of these dimensions takes (to choose top_k before filling it)."""
        per = np.dtype(CACHE_DTYPES[logprob_dtype]).itemsize
        per_token = vocab * per if top_k is None or top_k >= vocab else top_k * (per + 4)
        return int(n) * int(seq_len) * per_token

    def _alloc(self, name: str, dtype, width: int) -> np.ndarray:
        shape = (self.n, self.seq_len, width)
        if self._folder is None:
            return np.zeros(shape, dtype=dtype)  # zero pages are only committed once written
        return np.lib.format.open_memmap(self._folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    @property
    def nbytes(self) -> int:
        """Bytes of teacher targets held (in memory or in the memory-mapped files)."""
        return int(self.logprobs.nbytes + (0 if self.indices is None else self.indices.nbytes))

    @property
    def complete(self) -> bool:
        """Whether every row was put."""
        return bool(self.written.all())

    @staticmethod
    def _rows(rows: torch.Tensor | np.ndarray | list[int]) -> np.ndarray:
        return (rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)).astype(np.int64)

    def put(self, rows: torch.Tensor, targets: torch.Tensor | TopK) -> None:
        """Store ``targets`` ([b, T, V] log-probs or TopK [b, T, k], from
        :func:`~engine.lm.divergence.teacher_targets`) for ``rows``."""
        r = self._rows(rows)
        if self.top_k is None:
            if isinstance(targets, TopK):
                raise ShapeMismatch("this cache keeps full log-probs, got top-k targets")
            lp, idx = targets, None
            expected = (len(r), self.seq_len, self.vocab)
        else:
            if not isinstance(targets, TopK):
                raise ShapeMismatch(f"this cache keeps the top {self.top_k} tokens, got full log-probs")
            lp, idx = targets.logprobs, targets.indices
            expected = (len(r), self.seq_len, self.top_k)
            if tuple(idx.shape) != expected:
                raise ShapeMismatch(f"top-k indices {tuple(idx.shape)}, expected {expected}")
        if tuple(lp.shape) != expected:
            raise ShapeMismatch(f"teacher targets {tuple(lp.shape)}, expected {expected}")
        if len(r) and (r.min() < 0 or r.max() >= self.n):
            raise IndexError(f"rows outside 0..{self.n - 1}")
        lp = lp.detach().float().cpu()
        if bool(torch.isnan(lp).any()):
            raise InvalidModel("the teacher produced NaN log-probabilities")
        self.logprobs[r] = lp.numpy().astype(self.dtype)
        if idx is not None:
            idx = idx.detach().cpu()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab):
                raise ShapeMismatch(f"top-k token ids outside the vocabulary 0..{self.vocab - 1}")
            self.indices[r] = idx.numpy().astype(np.int32)  # type: ignore[index]
        self.written[r] = True

    def get(self, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor | TopK:
        """The targets of ``rows``: float32 log-probs [b, T, V], or TopK (float32 log-probs, int64 ids)."""
        r = self._rows(rows)
        if not self.written[r].all():
            raise KeyError(f"teacher targets of rows {r[~self.written[r]][:5].tolist()} were never put")
        lp = torch.from_numpy(np.asarray(self.logprobs[r], dtype=np.float32))
        if self.indices is None:
            return lp if device is None else lp.to(device)
        out = TopK(lp, torch.from_numpy(np.asarray(self.indices[r], dtype=np.int64)))
        return out if device is None else out.to(device)

    def close(self) -> None:
        """Drop the arrays and remove the memory-mapped files, if any."""
        self.logprobs = self.indices = None  # type: ignore[assignment]
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
