"""What a step trains on: input tables, the teacher-output cache, and the two bundled as :class:`StepData`.

In-memory inputs are tensors on the engine device and batches are taken by indexing (no DataLoader);
memory-mapped inputs are gathered per batch (pinned on CUDA). Teacher outputs (and hint features) are
computed once per transfer set and cached (:class:`TeacherCache`, memory-mapped float16 under
``out_dir/cache`` above :data:`CACHE_MEMORY_LIMIT`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.split import is_lazy

#: Teacher caches larger than this (bytes, float32) go to a float16 memory-mapped file.
CACHE_MEMORY_LIMIT = 1 << 30


def _to_model_array(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    return a.astype(np.float32, copy=False)


class Table:
    """Input rows in model order: tensors on ``device`` (in memory) or lazily gathered (memory-mapped)."""

    def __init__(self, arrays: Mapping[str, Any], device: torch.device):
        self.names = list(arrays)
        self.arrays = dict(arrays)
        self.device = device
        self.lazy = any(is_lazy(a) for a in arrays.values())
        self.n = int(next(iter(arrays.values())).shape[0])
        self.tensors: list[torch.Tensor] | None = None
        if not self.lazy:
            self.tensors = [torch.from_numpy(np.ascontiguousarray(_to_model_array(a))).to(device)
                            for a in arrays.values()]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], device: torch.device) -> Table:
        self = cls.__new__(cls)
        self.names = list(tensors)
        self.device = device
        self.lazy = False
        self.tensors = [t.to(device) for t in tensors.values()]
        self.arrays = {k: t.detach().cpu().numpy() for k, t in tensors.items()}
        self.n = int(self.tensors[0].shape[0])
        return self

    def _gather(self, rows: np.ndarray | slice) -> list[torch.Tensor]:
        out = []
        for a in self.arrays.values():
            t = torch.from_numpy(np.ascontiguousarray(_to_model_array(a[rows])))
            if self.device.type == "cuda":
                t = t.pin_memory().to(self.device, non_blocking=True)
            out.append(t)
        return out

    def take(self, idx: torch.Tensor) -> list[torch.Tensor]:
        if self.tensors is not None:
            return [t[idx.to(t.device)] for t in self.tensors]
        return self._gather(idx.cpu().numpy())

    def slice(self, a: int, b: int) -> list[torch.Tensor]:
        if self.tensors is not None:
            return [t[a:b] for t in self.tensors]
        return self._gather(slice(a, b))

    def subset(self, idx: np.ndarray) -> Table:
        from engine.data.split import take_rows

        return Table(take_rows(self.arrays, idx) if self.lazy else {k: np.asarray(v)[idx] for k, v in self.arrays.items()},
                     self.device)

    def batch_dict(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, tensors))

    def float_inputs(self) -> list[int]:
        return [i for i, a in enumerate(self.arrays.values()) if not np.issubdtype(np.asarray(a[:1]).dtype, np.integer)]


class TeacherCache:
    """Teacher outputs [N, D] (+ hint features) for a table's rows, computed once."""

    def __init__(self, outputs: Any, feats: dict[str, Any], device: torch.device, on_disk: bool):
        self.outputs, self.feats, self.device, self.on_disk = outputs, feats, device, on_disk

    @classmethod
    def build(cls, teacher: Any, table: Table, features: Sequence[str], *, device: torch.device,
              cache_dir: Path | None, should_stop: Callable[[], bool] | None, limit: int | None = None,
              tag: str = "cache") -> TeacherCache:
        from engine.teachers.loading import teacher_outputs

        limit = CACHE_MEMORY_LIMIT if limit is None else limit
        state: dict[str, Any] = {}
        n = table.n

        def on_batch(start: int, out: torch.Tensor, feats: dict[str, torch.Tensor]) -> None:
            if not state:
                row_bytes = 4 * (out[0].numel() + sum(v[0].numel() for v in feats.values()))
                on_disk = cache_dir is not None and n * row_bytes > limit
                state["on_disk"] = on_disk

                def alloc(name: str, row_shape: tuple[int, ...]) -> Any:
                    if on_disk:
                        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
                        safe = "".join(c if c.isalnum() else "_" for c in name)
                        return np.lib.format.open_memmap(Path(cache_dir) / f"{tag}-{safe}.npy", mode="w+",  # type: ignore[arg-type]
                                                         dtype=np.float16, shape=(n, *row_shape))
                    return torch.empty((n, *row_shape), dtype=torch.float32, device=device)

                state["out"] = alloc("outputs", tuple(out.shape[1:]))
                state["feats"] = {k: alloc(f"feat-{k}", tuple(v.shape[1:])) for k, v in feats.items()}
            stop = start + out.shape[0]

            def put(dst: Any, src: torch.Tensor) -> None:
                if isinstance(dst, np.ndarray):
                    dst[start:stop] = src.detach().cpu().numpy().astype(np.float16)
                else:
                    dst[start:stop] = src.to(dst.device, torch.float32)

            put(state["out"], out)
            for k, v in feats.items():
                put(state["feats"][k], v)

        teacher_outputs(teacher, table.arrays, features=list(features), should_stop=should_stop, on_batch=on_batch)
        return cls(state["out"], state["feats"], device, state["on_disk"])

    def _get(self, a: Any, idx: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            rows = idx if isinstance(idx, slice) else idx.cpu().numpy()
            return torch.from_numpy(np.asarray(a[rows], dtype=np.float32)).to(self.device)
        return a[idx.to(a.device) if isinstance(idx, torch.Tensor) else idx]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._get(self.outputs, idx), {k: self._get(v, idx) for k, v in self.feats.items()}

    def all_outputs(self) -> torch.Tensor:
        return self._get(self.outputs, slice(None))

    def subset(self, idx: np.ndarray) -> TeacherCache:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return TeacherCache(self._get(self.outputs, t), {k: self._get(v, t) for k, v in self.feats.items()},
                            self.device, False)


@dataclass
class StepData:
    """What one step trains on (the pipeline prepares it)."""

    table: Table
    labels: torch.Tensor | None
    cache: TeacherCache | None  # None when the step augments (teacher runs per batch)
    info: dict[str, Any] = field(default_factory=dict)
