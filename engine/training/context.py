"""What a job's steps leave for the pipeline: :class:`StepOutput`, one per step index in
``TrainContext.step_outputs``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepOutput:
    """What a step did and how to export its output.

    ``details``: merged into the step's report row (``prune`` stats, ``quantization`` notes,
    ``input_reduction``); ``export``: keyword overrides for the export (tolerance, skipped formats, the
    ONNX plan for torch-quantized models, the safetensors source for fp16/bf16).
    """

    details: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)


def step_output(ctx: Any, index: int) -> StepOutput:
    """``ctx.step_outputs[index]``, created empty on first use."""
    if index not in ctx.step_outputs:
        ctx.step_outputs[index] = StepOutput()
    return ctx.step_outputs[index]
