"""The base of every spec model: strict (unknown keys are errors) and built from JSON.

``Config`` forbids extra keys, so a typo in a spec is a 422 naming the key rather than a silently ignored
option. ``union`` builds the discriminated union of one component table (``{"type": "kd"}`` → ``KDLoss``).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    """A component's options. Frozen: the engine reads them, nothing rewrites them mid-job."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def union(table: dict[str, type[Config]], key: str) -> Any:
    """``Annotated[A | B | ..., Field(discriminator=key)]`` over the table's classes."""
    members = tuple(table.values())
    return Annotated[Union[members], Field(discriminator=key)]  # type: ignore[valid-type]


TASKS = ("classification", "regression", "embedding", "causal_lm")
MODEL_FORMATS = ("torchscript", "onnx", "torch_export", "safetensors", "hf_transformers")
DATASET_FORMATS = ("npz", "pt", "csv", "parquet", "image_folder", "jsonl")
#: The exports of a fixed-shape model (classification, regression, embedding); its default.
EXPORT_FORMATS = ("torchscript", "onnx", "safetensors")
#: The exports of a generative language model (``causal_lm``); ``hf`` is its default.
LM_EXPORT_FORMATS = ("hf", "gguf", "onnx")
ALL_EXPORT_FORMATS = ("torchscript", "onnx", "safetensors", "hf", "gguf")


def validation_message(exc: Any, limit: int = 5) -> str:
    """``path: reason`` for the first ``limit`` errors of a pydantic ``ValidationError``, e.g.
    ``steps[0].loss.kd.temperature: Input should be greater than 0`` (a union member's tag is in the path)."""
    errors = exc.errors(include_url=False)
    parts = []
    for e in errors[:limit]:
        where = ""
        for part in e["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        parts.append(f"{where or 'spec'}: {e['msg']}")
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def auto_or_within(value: Any, low: float, high: float, name: str, *, low_inclusive: bool = False) -> Any:
    """``value`` when it is ``"auto"`` or a number within ``(low, high]`` (``[low, high]`` with ``low_inclusive``);
    otherwise a ValueError naming the range. For fields whose value the engine may choose (``epochs``, ``lr``,
    ``temperature``): one message for both halves of the union, not one per member."""
    if isinstance(value, str):
        return value
    above = value >= low if low_inclusive else value > low
    if not (above and value <= high):
        lower = f"between {low:g} and {high:g}" if low_inclusive else f"> {low:g} and ≤ {high:g}"
        raise ValueError(f"{name} must be {lower} (or 'auto')")
    return value

