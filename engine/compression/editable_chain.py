"""What every reader of :mod:`engine.compression.editable` shares: the supported layer types, the
refusal naming what is in the way, and the numeric check of a rebuilt chain.

* :data:`SUPPORTED`: layer type names an editable chain may hold.
* :func:`unsupported`: ``EngineError("unsupported")`` for a model of one kind (TorchScript, torch.export,
  eager) holding ``what``.
* :func:`infer_example`: a random input [2, ...] sized from a model's first Linear/Conv layer, or None.
* :func:`verify`: the rebuilt ``nn.Sequential`` must give the reference's outputs (``allclose``) on the
  example inputs (or on guessed ones); else ``EngineError("unsupported")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from engine.errors import EngineError, Unsupported


#: Layer types an editable chain may contain (``original_name`` / class names).
SUPPORTED = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "LayerNorm",
    "ReLU",
    "GELU",
    "Tanh",
    "Sigmoid",
    "SiLU",
    "LeakyReLU",
    "Flatten",
    "Dropout",
    "MaxPool1d",
    "MaxPool2d",
    "AvgPool1d",
    "AvgPool2d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "Identity",
)
SUPPORTED_TEXT = ("Linear, Conv1d, Conv2d, BatchNorm, LayerNorm, ReLU/GELU/Tanh/Sigmoid/SiLU/LeakyReLU, Flatten, Dropout, "
                   "MaxPool, AvgPool, AdaptiveAvgPool in a single chain")


def unsupported(kind: str, what: str) -> EngineError:
    """Why a ``kind`` model cannot be edited: it holds ``what`` (an op, a layer, extra inputs)."""
    return Unsupported(f"this {kind} model cannot be edited: it contains {what}; supported: {SUPPORTED_TEXT}")


def tup(value: Any) -> Any:
    """A one-element list as its element, a longer list as a tuple (layer hyperparameters), else ``value``."""
    if isinstance(value, list):
        return value[0] if len(value) == 1 else tuple(value)
    return value


def infer_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """A random batch of 2 for the first Linear ([2, in]), Conv1d ([2, C, 32]) or Conv2d ([2, C, 16, 16])."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(2, m.in_channels, 32),)
        if isinstance(m, nn.Conv2d):
            return (torch.randn(2, m.in_channels, 16, 16),)
    return None


def verify(reference: Callable, result: nn.Sequential, example_inputs: Sequence[torch.Tensor] | None, kind: str,
            atol: float) -> None:
    """Refuse (``EngineError("unsupported")``) unless ``result`` reproduces ``reference`` within ``atol``."""
    candidates: list[tuple[torch.Tensor, ...]] = []
    if example_inputs is not None:
        candidates.append(tuple(example_inputs))
    else:
        inferred = infer_example(result)
        if inferred is not None:
            x = inferred[0]
            candidates.append(inferred)
            if x.dim() == 4:  # image models: try a few common sizes until one fits the chain
                candidates += [(torch.randn(2, x.shape[1], s, s),) for s in (8, 28, 32, 64, 224)]
    if not candidates:
        return
    errors = []
    for inputs in candidates:
        try:
            with torch.no_grad():
                want = reference(*inputs)
                got = result(*inputs)
        except Exception as exc:  # noqa: BLE001 - input shape guesses may not fit
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        if isinstance(want, (tuple, list)) and len(want) == 1:
            want = want[0]
        if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(want, got, atol=atol, rtol=1e-4):
            diff = (want - got).abs().max().item() if isinstance(want, torch.Tensor) and want.shape == got.shape else "shape"
            raise Unsupported(f"this {kind} model could not be rebuilt as an editable chain: outputs differ ({diff})")
        return
    if example_inputs is not None:
        raise Unsupported(f"this {kind} model could not be checked after rebuilding: {errors[0]}")
    # No guessed input fits (e.g. a CNN with a fixed flatten size): the caller should pass example_inputs.
    raise Unsupported(f"this {kind} model could not be checked after rebuilding (pass example_inputs): {errors[-1]}")
