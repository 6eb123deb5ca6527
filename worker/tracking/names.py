"""Job values as MLflow names: the spec flattened into params, metric keys, all within MLflow's rules.

MLflow keys may hold letters, digits, ``_ - . space`` and ``/``, must not change under path normalisation and
are at most 250 characters; param values at most 6000. Anything else from a spec or an executor (metadata
keys are free text, metric names come from the untrusted side) is rewritten here, never sent as is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

MAX_KEY = 250
MAX_PARAM_VALUE = 6000
_BAD = re.compile(r"[^A-Za-z0-9_.\- ]")


def key(*parts: object) -> str:
    """``parts`` joined by ``/`` as one valid key: other characters become ``_``, ``.``/``..`` parts get a
    leading ``_`` (so the key is its own normal form)."""
    cleaned = []
    for part in parts:
        text = _BAD.sub("_", str(part)).strip() or "_"
        cleaned.append("_" + text if text.startswith(".") else text)
    return "/".join(cleaned)[:MAX_KEY]


def flatten(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Leaves of a JSON value with their paths: ``{"steps": [{"kind": "distill"}]}`` → ``(("steps", "0",
    "kind"), "distill")``. A list of plain values is one leaf (``"hidden": [64, 32]``)."""
    if isinstance(value, Mapping):
        if not value and prefix:
            yield prefix, "{}"
        for k, v in value.items():
            yield from flatten(v, (*prefix, str(k)))
    elif isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
        for i, v in enumerate(value):
            yield from flatten(v, (*prefix, str(i)))
    else:
        yield prefix, value


def params(spec: Mapping[str, Any]) -> dict[str, str]:
    """The stored spec as MLflow params: dotted paths (``steps.0.loss.temperature``) → text values."""
    out: dict[str, str] = {}
    for path, value in flatten(spec):
        text = value if isinstance(value, str) else json.dumps(value)
        out[".".join(key(p) for p in path)[:MAX_KEY]] = text[:MAX_PARAM_VALUE]
    return out


def metric_key(step_index: int, name: str) -> str:
    """The MLflow key of a per-epoch metric: its name for the job's first step, ``step<i>/<name>`` after it
    (epochs restart at each step, so each step's series is its own)."""
    return key(name) if step_index == 0 else key(f"step{step_index}", name)


def numbers(row: Mapping[str, Any], prefix: str | None = None) -> dict[str, float]:
    """Finite numeric leaves of a report row as final metrics: ``{"latency_ms": {"batch_1": 0.2}}`` with
    prefix ``student`` → ``{"student.latency_ms.batch_1": 0.2}``."""
    out = {}
    for path, value in flatten(row):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        parts = (prefix, *path) if prefix else path
        out[".".join(key(p) for p in parts)[:MAX_KEY]] = float(value)
    return out
