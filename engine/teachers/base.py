"""The :class:`Teacher` interface every teacher format implements, and output normalisation.

``teacher.bind(inputs)`` fixes the dataset input order; ``teacher({name: tensor})`` returns
float32 outputs ``[B, D]`` on ``teacher.device`` (see :func:`as_outputs`: dicts, tuples and
numpy arrays are normalised, anything that is not ``[B, D]`` is ``EngineError("shape_mismatch")``).
Formats live in :mod:`.teachers_torch` and :mod:`.teachers_onnx`; :mod:`.teachers` loads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import ShapeMismatch, Unsupported

Batch = Mapping[str, torch.Tensor]


class Teacher(ABC):
    """Common interface; subclasses implement ``_forward``, ``_features`` and ``latency_fn``."""

    format = ""
    module: nn.Module | None = None
    architecture: dict[str, Any] | None = None

    def __init__(self, path: Path, device: torch.device, task: str = "classification"):
        self.path = Path(path)
        self.device = device
        self.task = task
        self.inputs: list[str] = ["x"]

    def bind(self, inputs: Sequence[str]) -> None:
        """Fix the dataset's input names (positional order for torch teachers)."""
        self.inputs = list(inputs)

    # -- what subclasses provide -------------------------------------------
    @abstractmethod
    def _forward(self, batch: Batch) -> Any:
        """Raw teacher output for a batch of named input tensors (logits, or a tuple/dict holding them)."""

    def _features(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise Unsupported(f"{self.format} teachers do not support hints")

    def feature_names(self) -> list[str]:
        return []

    @abstractmethod
    def latency_fn(self, batch: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """A no-argument callable running the teacher once on ``batch`` in its own runtime (for timing)."""

    @property
    @abstractmethod
    def num_parameters(self) -> int:
        """Weights in the teacher (parameters, or ONNX initializer elements)."""

    def precheck(self, row_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise shape_mismatch early when declared inputs cannot take the dataset's rows."""

    def expected_features(self) -> int | None:
        return None

    # -- shared --------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def _batch(self, x: Any) -> dict[str, torch.Tensor]:
        if isinstance(x, Mapping):
            return {k: torch.as_tensor(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return {n: torch.as_tensor(v) for n, v in zip(self.inputs, x)}
        return {self.inputs[0]: torch.as_tensor(x)}

    def __call__(self, x: Any) -> torch.Tensor:
        """float32 outputs [B, D] on ``self.device`` for a batch ({name: [B, ...]}, or one array)."""
        batch = self._batch(x)
        rows = int(next(iter(batch.values())).shape[0])
        out = self._forward(batch)
        return as_outputs(out, rows, self.task).to(self.device)

    def features(self, x: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Intermediate features {name: float32 [B, ...]} (``"penultimate"``: input of the last linear layer)."""
        batch = self._batch(x)
        feats = self._features(batch, list(names))
        return {k: v.detach().float().to(self.device) for k, v in feats.items()}


def as_outputs(out: Any, rows: int, task: str = "classification") -> torch.Tensor:
    """Normalise a model output to a float32 [rows, D] tensor, or raise shape_mismatch."""
    if isinstance(out, Mapping):
        for key in ("logits", "embeddings", "embedding", "predictions", "output", "outputs", "pooler_output"):
            if key in out:
                out = out[key]
                break
        else:
            raise ShapeMismatch(f"teacher returned a dict with keys {sorted(out)}; expected a 'logits' entry"
            )
    if isinstance(out, (tuple, list)):
        # (logits, aux...) outputs: the first element is the output by convention.
        if not out:
            raise ShapeMismatch("teacher returned an empty tuple; expected outputs [rows, D]")
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, torch.Tensor):
        raise ShapeMismatch(f"teacher returned {type(out).__name__}; expected a tensor [rows, D]")
    if not out.is_floating_point():
        raise ShapeMismatch(f"teacher output has dtype {out.dtype}; expected float outputs")
    if out.dim() == 1 and task == "regression" and out.shape[0] == rows:
        out = out.unsqueeze(1)
    if out.dim() != 2:
        what = "logits [rows, classes]" if task == "classification" else "outputs [rows, D]"
        raise ShapeMismatch(f"teacher output has shape {list(out.shape)}; expected 2-D {what}")
    if out.shape[0] != rows:
        raise ShapeMismatch(f"teacher returned {out.shape[0]} output rows for {rows} input rows (shape {list(out.shape)})"
        )
    return out.float()
