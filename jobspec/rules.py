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

from jobspec.base import EXPORT_FORMATS, LM_EXPORT_FORMATS
from jobspec.job import JobSpec
from jobspec.losses import Loss, TokenKDLoss
from jobspec.steps import DistillStep, GenerateStep, PruneStep, QuantizeStep
from jobspec.students import DeriveRatios, DerivedStudent, HFCausalLMStudent, UploadedStudent
from jobspec.training import OptimizerConfig, ScheduleConfig

#: Teacher tasks each loss applies to.
LOSS_TASKS: dict[str, frozenset[str]] = {
    "kd": frozenset({"classification"}),
    "soft_ce": frozenset({"classification"}),
    "hard": frozenset({"classification"}),
    "mse": frozenset({"classification", "regression", "embedding"}),
    "cosine": frozenset({"embedding"}),
    "token_kd": frozenset({"causal_lm"}),
}
#: Generative language models: the teacher format they come in, and their own defaults for a distill step
#: (applied where the request left the field out, see :func:`with_task_defaults`).
LM_TASK = "causal_lm"
LM_FORMATS = frozenset({"hf_transformers"})
LM_STEP_DEFAULTS = {"loss": TokenKDLoss(), "epochs": 3, "batch_size": 8,
                    "optimizer": OptimizerConfig(type="adamw", lr=5e-4, weight_decay=0.01),
                    "schedule": ScheduleConfig(type="cosine", warmup_fraction=0.05)}
#: Compression of causal LMs: MLP channel pruning (Wanda-ranked) and dynamic int8 (engine/lm/compress.py).
LM_COMPRESSION = {"prune": ("channel",), "quantize": ("dynamic_int8",)}
#: DistillStep fields that only a causal_lm job reads, with their defaults.
LM_STEP_FIELDS = {"max_seq_len": 256, "grad_accumulation": 1, "gradient_checkpointing": False, "on_policy": 0.0}


def loss_tasks(loss: Loss) -> frozenset[str]:
    """The teacher tasks ``loss`` applies to; ``mse`` on probabilities needs class outputs."""
    if loss.type == "mse" and loss.target == "probabilities":
        return frozenset({"classification"})
    return LOSS_TASKS[loss.type]


#: Gate metrics measured for each teacher task.
GATE_METRIC_TASKS: dict[str, frozenset[str]] = {
    "accuracy": frozenset({"classification"}),
    "agreement": frozenset({"classification", "causal_lm"}),
    "f1_macro": frozenset({"classification"}),
    "r2": frozenset({"regression"}),
    "cosine": frozenset({"embedding"}),
    "perplexity": frozenset({"causal_lm"}),
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
    #: causal_lm: a digest of each model's tokenizer vocabulary (model id → sha256), to refuse a student whose
    #: tokens mean something else than the teacher's before any training.
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    #: Each dataset's format (dataset id → format), where known: text (``jsonl``) is for causal_lm teachers only.
    formats: Mapping[str, str] = field(default_factory=dict)
    #: Each model's format (model id → format), where known.
    model_formats: Mapping[str, str] = field(default_factory=dict)
    #: jsonl datasets: their record kind (``text``, ``prompt_completion``, ``messages``, ``prompt``), where known.
    kinds: Mapping[str, str] = field(default_factory=dict)


def with_task_defaults(spec: JobSpec, task: str) -> JobSpec:
    """``spec`` with the defaults of its teacher's task where the request left a field out (pydantic's
    ``model_fields_set``): a causal_lm job exports ``hf``, distills with ``token_kd`` for 3 epochs in batches
    of 8 sequences with AdamW (5e-4, warm-up), and ``derive`` keeps the teacher's width. Called by the API
    before the spec is stored; the stored spec then names every value, so the engine runs exactly it."""
    if task != LM_TASK and spec.teacher is None:
        return spec
    update: dict = {}
    if "exports" not in spec.model_fields_set:
        update["exports"] = ["hf"]
    if isinstance(spec.student, DerivedStudent) and "width" not in spec.student.derive.model_fields_set:
        derive = DeriveRatios(width=1.0, depth=spec.student.derive.depth)
        update["student"] = spec.student.model_copy(update={"derive": derive})
    steps = []
    for step in spec.steps:
        if isinstance(step, DistillStep):
            missing = {k: v for k, v in LM_STEP_DEFAULTS.items() if k not in step.model_fields_set}
            if "schedule" not in missing and "type" not in step.schedule.model_fields_set:
                # a schedule that names only its warm-up gets the LM default's clock, not the classic plateau
                missing["schedule"] = step.schedule.model_copy(update={"type": LM_STEP_DEFAULTS["schedule"].type})
            step = step.model_copy(update=missing) if missing else step
        elif isinstance(step, PruneStep) and step.finetune is not None:
            missing = {k: v for k, v in LM_STEP_DEFAULTS.items()
                       if k not in step.finetune.model_fields_set and k in ("loss", "batch_size")}
            step = step.model_copy(update={"finetune": step.finetune.model_copy(update=missing)}) if missing else step
        steps.append(step)
    update["steps"] = steps
    return spec.model_copy(update=update)


def _endpoint_conflicts(spec: JobSpec) -> Iterator[Conflict]:
    """A served teacher gives completions and its top log-probabilities at T = 1, nothing else."""
    if not isinstance(spec.student, UploadedStudent):
        yield Conflict("student", "a served teacher has no weights to derive or size a student from: upload the "
                       "student (an hf_transformers model with the served model's tokenizer) and give its "
                       "'model_id'")
    top = spec.teacher.endpoint.top_logprobs
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]"
        if isinstance(step, PruneStep | QuantizeStep):
            yield Conflict(where, f"{step.kind} steps are not available with a served teacher", unsupported=True)
        if not isinstance(step, DistillStep) or step.loss.type != "token_kd":
            continue
        if step.loss.temperature != 1.0:
            yield Conflict(f"{where}.loss.temperature", "a served teacher's log-probabilities are at temperature 1; "
                           "set temperature 1.0")
        if step.loss.top_k is not None and step.loss.top_k > top:
            yield Conflict(f"{where}.loss.top_k", f"the endpoint is asked for {top} alternatives per token "
                           f"(teacher.endpoint.top_logprobs); top_k must be at most that")
        if step.on_policy:
            yield Conflict(f"{where}.on_policy", "on-policy batches with a served teacher are not available yet",
                           unsupported=True)


def _lm_conflicts(spec: JobSpec, facts: Facts) -> Iterator[Conflict]:
    """What a causal_lm job cannot combine (today: distill steps with token_kd, HF students, hf/gguf/onnx)."""
    if spec.teacher is not None:
        yield from _endpoint_conflicts(spec)
    elif facts.teacher_format not in LM_FORMATS:
        yield Conflict("teacher_model_id", f"a causal_lm teacher must be uploaded as hf_transformers (a zipped "
                       f"Hugging Face model directory), not {facts.teacher_format}")
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]"
        if isinstance(step, GenerateStep):
            ds_id = step.dataset_id or spec.dataset_id
            if facts.kinds.get(ds_id or "") not in (None, "prompt", "prompt_completion"):
                yield Conflict(f"{where}.dataset_id", f"generate writes completions for prompts: dataset {ds_id} "
                               f"holds {facts.kinds[ds_id]!r} records; give {{\"prompt\"}} records")
            continue
        if isinstance(step, PruneStep | QuantizeStep):
            if step.method not in LM_COMPRESSION[step.kind]:
                yield Conflict(f"{where}.method", f"{step.kind} '{step.method}' is not available for causal_lm "
                               f"models; use: {', '.join(LM_COMPRESSION[step.kind])}", unsupported=True)
            if isinstance(step, PruneStep) and step.iterations != 1:
                yield Conflict(f"{where}.iterations", "causal_lm models are pruned in one round", unsupported=True)
            if spec.student is None:
                yield Conflict(where, f"{step.kind} works on a distilled causal_lm student: add a student and a "
                               "distill step first", unsupported=True)
            continue
        for name in ("hints", "synthesize", "coreset", "input_reduction", "augment", "early_stopping"):
            if getattr(step, name):
                yield Conflict(f"{where}.{name}", f"'{name}' does not apply to a causal_lm teacher", unsupported=True)
        autos = [name for name, value in (("epochs", step.epochs), ("optimizer.lr", step.optimizer.lr),
                                          ("loss.temperature", getattr(step.loss, "temperature", None)))
                 if value == "auto"]
        for name in autos:
            yield Conflict(f"{where}.{name}", "'auto' is not available for causal_lm jobs yet; name the value",
                           unsupported=True)
        if step.schedule.type == "plateau":
            yield Conflict(f"{where}.schedule.type", "causal_lm steps follow a clock schedule ('cosine', 'constant', "
                           "'one_cycle'); they keep the best epoch's weights on their own", unsupported=True)
    student = spec.student
    if student is not None and not isinstance(student, (HFCausalLMStudent, DerivedStudent, UploadedStudent)):
        yield Conflict("student", f"a causal_lm teacher distills into {{\"derive\": {{\"depth\": 0.5}}}}, "
                       f"{{\"family\": \"hf_causal_lm\", \"config\": {{...}}}} or an uploaded hf_transformers "
                       f"model, not family {student.family!r}")
    if isinstance(student, UploadedStudent):
        theirs, ours = facts.tokenizers.get(student.model_id), facts.tokenizers.get(spec.teacher_model_id or "")
        if facts.model_formats.get(student.model_id, "hf_transformers") != "hf_transformers":
            yield Conflict("student.model_id", f"the student of a causal_lm teacher must be an hf_transformers "
                           f"model (this one is {facts.model_formats[student.model_id]})")
        elif ours is not None and theirs is not None and theirs != ours:
            yield Conflict("student.model_id", "the student's tokenizer differs from the teacher's (another "
                           "vocabulary): token-level KD compares distributions over the same tokens; use a "
                           "student built with the teacher's tokenizer, or 'derive' / 'hf_causal_lm'")
    for ds_id, fmt in facts.formats.items():
        if fmt != "jsonl":
            yield Conflict("dataset_id", f"dataset {ds_id} is {fmt}; a causal_lm teacher trains on text records "
                           "(format 'jsonl')")
    for fmt in spec.exports:
        if fmt not in LM_EXPORT_FORMATS:
            yield Conflict("exports", f"'{fmt}' is not an export of a causal_lm model; use: "
                           f"{', '.join(LM_EXPORT_FORMATS)}")


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
    if task == LM_TASK or spec.teacher is not None:
        yield from _lm_conflicts(spec, facts)
    else:
        yield from _classic_only(spec, facts)
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]"
        if isinstance(step, GenerateStep):
            continue  # makes data: checked with the causal_lm rules
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
                if spec.steps[i].kind == "generate" or spec.generated_for(i) is not None:
                    continue  # the teacher's completions are the data's targets
                if ds_id is None:
                    yield Conflict("baseline", f"the baseline trains on labels alone, but steps[{i}] is data-free")
                elif not facts.labelled.get(ds_id, False):
                    yield Conflict("baseline", f"the baseline trains on labels alone, but dataset {ds_id} "
                                   f"(steps[{i}]) has none")


def _classic_only(spec: JobSpec, facts: Facts) -> Iterator[Conflict]:
    """What only a causal_lm job may ask for."""
    if facts.teacher_format in LM_FORMATS:
        yield Conflict("teacher_model_id", f"an hf_transformers teacher is a generative language model: upload it "
                       f"with task 'causal_lm' (this one is {facts.task})", unsupported=True)
    if isinstance(spec.student, HFCausalLMStudent):
        yield Conflict("student.family", "'hf_causal_lm' students are for causal_lm teachers")
    for i, step in enumerate(spec.steps):
        if isinstance(step, GenerateStep):
            yield Conflict(f"steps[{i}]", "generate steps make text with a causal_lm teacher")
    if spec.devices > 1:
        yield Conflict("devices", "data-parallel training ('devices' > 1) is for causal_lm teachers",
                       unsupported=True)
    for ds_id, fmt in facts.formats.items():
        if fmt == "jsonl":
            yield Conflict("dataset_id", f"dataset {ds_id} holds text records (jsonl), which only a causal_lm "
                           f"teacher trains on; this teacher is {_a(facts.task)} model")
    for i, step in enumerate(spec.steps):
        if isinstance(step, DistillStep):
            for name, default in LM_STEP_FIELDS.items():
                if getattr(step, name) != default:
                    yield Conflict(f"steps[{i}].{name}", f"'{name}' applies to causal_lm teachers only")
    for fmt in spec.exports:
        if fmt not in EXPORT_FORMATS:
            yield Conflict("exports", f"'{fmt}' exports a generative language model; this job's student exports "
                           f"as: {', '.join(EXPORT_FORMATS)}")
