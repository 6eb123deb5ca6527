"""Which models must stay on the CPU: quantized torch modules (int8 kernels are CPU kernels) and ONNX
Runtime sessions. One mark, one question, instead of attributes read ad hoc.

``mark_cpu_only(model)`` records it on the instance (so ``copy.deepcopy`` keeps it);
``is_cpu_only(model)`` is true for marked instances and for classes declaring ``CPU_ONLY = True``.
"""

from __future__ import annotations

from typing import Any

_MARK = "_distillery_cpu_only"


def mark_cpu_only(model: Any) -> Any:
    """Mark ``model`` as CPU-only; returns it."""
    setattr(model, _MARK, True)
    return model


def is_cpu_only(model: Any) -> bool:
    return bool(getattr(type(model), "CPU_ONLY", False) or model.__dict__.get(_MARK, False))
