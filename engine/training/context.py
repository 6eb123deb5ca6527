"""The state a job's steps work on: :class:`TrainContext` (student, teacher, held-out data, reporter,
the job's generator), and what each step leaves for the pipeline: :class:`StepOutput`, one per step
index in ``TrainContext.step_outputs``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.devices import is_cpu_only
from engine.errors import Cancelled
from engine.metrics import predict, task_metrics
from engine.training.progress import ProgressTracker
from engine.training.tables import StepData, Table
from engine.values import Reporter


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


@dataclass
class TrainContext:
    """Everything a step needs. Steps may replace ``student``/``architecture``.

    ``val``: held-out inputs; ``t_val``: the teacher's held-out outputs [N, D];
    ``y_val``: labels or None. ``step_data(step, index, features)`` returns the
    step's :class:`StepData` (pipeline-provided: dataset choice, coreset, synthesis, cache).
    """

    student: nn.Module
    architecture: dict[str, Any]
    device: torch.device
    task: str
    teacher: Any
    val: Table
    t_val: torch.Tensor
    y_val: torch.Tensor | None
    reporter: Reporter
    generator: torch.Generator
    progress: ProgressTracker
    step_data: Callable[[Any, int, Sequence[str]], StepData]
    history: list[dict[str, Any]] = field(default_factory=list)
    step_info: dict[int, dict[str, Any]] = field(default_factory=dict)
    baseline: bool = False  # train on labels only (CE / MSE), no teacher
    metric_prefix: str = "val_"
    #: builds a fresh student of the job's family for other inputs (``input_reduction``): list[InputInfo] -> (model, arch)
    make_student: Callable[[Any], tuple[nn.Module, dict[str, Any]]] | None = None
    seed: int = 0
    #: filled by compression steps: what the step did (``prune`` stats, ``quantization`` notes, ...)
    #: and how to export its output (see :mod:`engine.steps.compress`)
    step_outputs: dict[int, StepOutput] = field(default_factory=dict)
    #: scratch files of compression steps (ONNX before/after quantization); removed after the steps
    work_dir: Path = Path("work")
    #: :class:`.checkpoint.JobCheckpoints` when the job checkpoints (``fit(..., resumable=True)`` uses it)
    checkpoint: Any = None

    def journal(self) -> dict[str, Any]:
        """What a checkpoint records of the job so far: metric history, per-step info, progress counters."""
        return {"history": self.history, "step_info": self.step_info,
                "progress": {"done_epochs": self.progress.done_epochs,
                             "epoch_seconds": list(self.progress.epoch_seconds)}}

    def predict(self) -> torch.Tensor:
        model = self.student
        if is_cpu_only(model):  # quantized torch / ONNX Runtime models run on CPU
            def take(a: int, b: int) -> list[torch.Tensor]:
                return [t.cpu() for t in self.val.slice(a, b)]

            return predict(model, None, take=take, n=self.val.n).to(self.t_val.device)  # type: ignore[arg-type]
        return predict(model, None, take=self.val.slice, n=self.val.n)  # type: ignore[arg-type]

    def evaluate(self, outputs: torch.Tensor | None = None) -> dict[str, float]:
        """Held-out task metrics of the current student."""
        if outputs is None:
            outputs = self.predict()
        return task_metrics(self.task, outputs, self.t_val, self.y_val)

    def check_stop(self, where: str) -> None:
        if self.reporter.should_stop():
            raise Cancelled(f"job cancelled by request {where}")
