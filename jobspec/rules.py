"""Compatibility rules between a spec and the facts of its teacher and datasets, written once.

The API checks them from the stored metadata before answering 202 (a 422 ``incompatible_spec``), and the
engine checks them again at job start from the files themselves (``invalid_spec`` / ``unsupported``), so a
spec that slips past one is stopped by the other with the same message.

Usage::

    for problem in conflicts(spec, Facts(task="regression", teacher_format="onnx", labelled={"ds_1": True})):
        raise ...(problem.message)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from jobspec.job import JobSpec
from jobspec.losses import Loss
from jobspec.steps import DistillStep, PruneStep, QuantizeStep

#: Teacher tasks each loss applies to.
LOSS_TASKS: dict[str, frozenset[str]] = {
    "kd": frozenset({"classification"}),
    "soft_ce": frozenset({"classification"}),
    "hard": frozenset({"classification"}),
    "mse": frozenset({"classification", "regression", "embedding"}),
    "cosine": frozenset({"embedding"}),
}


def loss_tasks(loss: Loss) -> frozenset[str]:
    """The teacher tasks ``loss`` applies to; ``mse`` on probabilities needs class outputs."""
    if loss.type == "mse" and loss.target == "probabilities":
        return frozenset({"classification"})
    return LOSS_TASKS[loss.type]


#: Gate metrics measured for each teacher task.
GATE_METRIC_TASKS: dict[str, frozenset[str]] = {
    "accuracy": frozenset({"classification"}),
    "agreement": frozenset({"classification"}),
    "f1_macro": frozenset({"classification"}),
    "r2": frozenset({"regression"}),
    "cosine": frozenset({"embedding"}),
}
#: Gate metrics scored against labels (the others compare with the teacher).
LABELLED_GATE_METRICS = frozenset({"accuracy", "f1_macro", "r2"})
#: Early-stopping metrics each task can watch (``auto`` and ``loss`` always apply).
EARLY_STOPPING_TASKS: dict[str, frozenset[str]] = {
    "auto": frozenset({"classification", "regression", "embedding"}),
    "loss": frozenset({"classification", "regression", "embedding"}),
    "accuracy": frozenset({"classification"}),
    "agreement": frozenset({"classification"}),
    "mse": frozenset({"regression", "embedding"}),
    "cosine": frozenset({"embedding"}),
}
#: Quantizers that edit a torch module (everything but ONNX Runtime's).
TORCH_QUANTIZERS = frozenset({"dynamic_int8", "static_int8", "fp16", "bf16", "qat"})
TORCH_FORMATS = frozenset({"torchscript", "torch_export", "safetensors"})
#: Data-free distillation trains a generator through the teacher's gradients on class outputs.
SYNTHESIS_TASKS = frozenset({"classification"})


@dataclass(frozen=True)
class Facts:
    """What is known about the job's inputs: the teacher's ``task`` and ``format``, and for each dataset
    id whether it has labels (``labelled``; a dataset missing from it is treated as unlabelled)."""

    task: str
    teacher_format: str
    labelled: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Conflict:
    """One broken rule: ``path`` in the spec, a message naming the fix, and ``unsupported`` when the spec is
    valid but this combination is not implemented (the engine reports it as code ``unsupported``)."""

    path: str
    message: str
    unsupported: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _a(task: str) -> str:
    return f"an {task}" if task[0] in "aeiou" else f"a {task}"


def _allowed(table: Mapping[str, frozenset[str]], task: str) -> str:
    return ", ".join(sorted(name for name, tasks in table.items() if task in tasks))


def conflicts(spec: JobSpec, facts: Facts) -> Iterator[Conflict]:
    """Every rule ``spec`` breaks given ``facts``, in spec order."""
    task, onnx_teacher = facts.task, facts.teacher_format not in TORCH_FORMATS
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]"
        loss = step.loss if isinstance(step, DistillStep) else (step.finetune.loss if step.finetune else None)
        if isinstance(step, QuantizeStep) and step.method == "qat" and step.finetune is None:
            loss = None  # the Finetune defaults: KD, checked below with the task
            if task not in LOSS_TASKS["kd"]:
                yield Conflict(f"{where}.finetune.loss", f"qat fine-tunes with 'kd' by default, which does not "
                               f"apply to {_a(task)} teacher; give finetune.loss (one of: "
                               f"{_allowed(LOSS_TASKS, task)})")
        if loss is not None and task not in loss_tasks(loss):
            path = f"{where}.loss" if isinstance(step, DistillStep) else f"{where}.finetune.loss"
            yield Conflict(path, f"'{loss.type}' does not apply to {_a(task)} teacher; use one of: "
                           f"{_allowed(LOSS_TASKS, task)}")
        if step.gate is not None:
            metric = step.gate.metric
            if task not in GATE_METRIC_TASKS[metric]:
                yield Conflict(f"{where}.gate.metric", f"'{metric}' is not measured for {_a(task)} teacher; use one "
                               f"of: {_allowed(GATE_METRIC_TASKS, task)}")
            elif metric in LABELLED_GATE_METRICS and not facts.labelled.get(spec.heldout_dataset_id() or "", False):
                yield Conflict(f"{where}.gate.metric", f"'{metric}' is scored against labels, but the held-out "
                               "data has none (use 'agreement' for unlabelled data)")
        if isinstance(step, DistillStep):
            es = step.early_stopping
            if es is not None and task not in EARLY_STOPPING_TASKS[es.metric]:
                yield Conflict(f"{where}.early_stopping.metric", f"'{es.metric}' does not apply to a {task} "
                               f"teacher; use one of: {_allowed(EARLY_STOPPING_TASKS, task)}")
            if step.synthesize is not None:
                if task not in SYNTHESIS_TASKS:
                    yield Conflict(f"{where}.synthesize", f"data-free distillation needs a classification "
                                   f"teacher (this one is {task})")
                if onnx_teacher:
                    yield Conflict(f"{where}.synthesize", "data-free distillation trains a generator through the "
                                   "teacher, which needs a torch teacher (torchscript, torch_export or "
                                   "safetensors), not onnx")
        elif spec.student is None and onnx_teacher and (
                isinstance(step, PruneStep) or step.method in TORCH_QUANTIZERS):
            yield Conflict(where, f"{step.kind} '{step.method}' edits a torch model, but the teacher is ONNX and "
                           "the job has no student: quantize it with 'onnx_int8', or add a student and a distill "
                           "step first", unsupported=True)
    if spec.baseline:
        if task == "embedding":
            yield Conflict("baseline", "an embedding teacher has no labels to train a baseline on")
        else:
            for i in range(len(spec.steps)):
                ds_id = spec.step_dataset_id(i)
                if ds_id is None:
                    yield Conflict("baseline", f"the baseline trains on labels alone, but steps[{i}] is data-free")
                elif not facts.labelled.get(ds_id, False):
                    yield Conflict("baseline", f"the baseline trains on labels alone, but dataset {ds_id} "
                                   f"(steps[{i}]) has none")
