"""Where a job computes: which models must stay on the CPU, and how many CPU threads a job uses.

Which models stay on the CPU: quantized torch modules (int8 kernels are CPU kernels) and ONNX
Runtime sessions. One mark, one question, instead of attributes read ad hoc.

``mark_cpu_only(model)`` records it on the instance (so ``copy.deepcopy`` keeps it);
``is_cpu_only(model)`` is true for marked instances and for classes declaring ``CPU_ONLY = True``.
"""

from __future__ import annotations

import os
from typing import Any

_MARK = "_distillery_cpu_only"


def mark_cpu_only(model: Any) -> Any:
    """Mark ``model`` as CPU-only; returns it."""
    setattr(model, _MARK, True)
    return model


def is_cpu_only(model: Any) -> bool:
    return bool(getattr(type(model), "CPU_ONLY", False) or model.__dict__.get(_MARK, False))


#: Work per batch (teacher weights × batch size) below which a job uses one intra-op thread. Splitting a
#: small matmul across threads saves little on an idle machine (≈ 10 % for a 50k-weight MLP at batch 128)
#: and costs up to 10× when the other cores are busy (other executors, the worker, an API on the same
#: host): the threads spin-wait for each other on every op.
SMALL_BATCH_WORK = 2 ** 24


def cpu_threads(weights: int, batch_size: int, available: int | None = None) -> int:
    """Intra-op threads for a CPU job whose deployment names none: 1 for small work per batch
    (``weights * batch_size < SMALL_BATCH_WORK``), else every core this process may run on."""
    if available is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if weights * batch_size < SMALL_BATCH_WORK else max(1, available)
