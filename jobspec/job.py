"""The job spec: what ``POST /v1/jobs`` accepts and what the engine runs, one definition for both.

The API validates the request body with :class:`JobSpec` and stores ``model_dump(mode="json")`` as the
job's ``spec``; the engine validates that stored JSON with the same class at job start. Rules that need
facts about the uploaded teacher and datasets (task, format, labels) are in :mod:`jobspec.rules`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, model_validator

from jobspec.base import EXPORT_FORMATS, Config
from jobspec.data import InputSpec
from jobspec.search import SearchConfig
from jobspec.steps import DistillStep, Step
from jobspec.students import Student, UploadedStudent
from jobspec.tracking import Tracking

ExportFormat = Literal["torchscript", "onnx", "safetensors", "hf", "gguf"]
MetadataValue = Union[str, int, float, bool, None]
SEED_MAX = 2**31 - 1


class EndpointTeacher(Config):
    """A causal LM served behind an OpenAI-compatible API (``POST {url}/completions``). Its host must be on the
    deployment's allow-list (``DISTILLERY_TEACHER_ENDPOINT_HOSTS``); credentials come from the deployment
    (``DISTILLERY_TEACHER_ENDPOINT_API_KEY``), never from the spec."""

    url: str = Field(min_length=8, max_length=500, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
                     examples=["https://llm.internal/v1"], description="Base URL of the API (ends before /completions).")
    model: str = Field(min_length=1, max_length=200, description="The served model's name.")
    top_logprobs: int = Field(20, ge=1, le=20, description="Alternatives per token asked for (OpenAI caps it at 20); "
                                                           "token_kd keeps them as its top-k.")


class TeacherRef(Config):
    """The teacher when it is not an uploaded model."""

    endpoint: EndpointTeacher


class JobSpec(Config):
    """What POST /v1/jobs accepts. Stored with defaults filled as the job's ``spec``."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False,
        json_schema_extra={
            "examples": [{
                "teacher_model_id": "mdl_0194f3a2c1d2a1b2c3d4e5f6a7b8",
                "dataset_id": "ds_0194f3a2c1d2a1b2c3d4e5f6a7b8",
                "student": {"family": "mlp", "hidden": [64]},
                "steps": [{"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9},
                           "epochs": 20, "batch_size": 128, "optimizer": {"type": "adamw", "lr": 0.001}}],
                "val_fraction": 0.1,
                "exports": ["torchscript", "onnx", "safetensors"],
                "seed": 0,
                "metadata": {"team": "search"},
            }]
        },
    )

    teacher_model_id: str | None = Field(None, min_length=1, max_length=40,
                                         description="The uploaded teacher (or 'teacher' for a served one).")
    teacher: TeacherRef | None = Field(None, description="causal_lm: a teacher served by an OpenAI-compatible "
                                                         "endpoint, instead of teacher_model_id.")
    dataset_id: str | None = Field(None, max_length=40, description="Transfer data; omit for data-free jobs.")
    eval_dataset_id: str | None = Field(None, max_length=40, description="Held-out data to score the result on.")
    input_spec: InputSpec | None = Field(None, description="Input shape for data-free jobs.")
    student: Student | None = None
    steps: list[Step] = Field(default_factory=lambda: [DistillStep()], min_length=1, max_length=16)
    baseline: bool = Field(False, description="Also train the student on labels alone, same budget; report both.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share when the dataset has no x_val.")
    exports: list[ExportFormat] = Field(default_factory=lambda: list(EXPORT_FORMATS), max_length=5,
                                        description="Default: torchscript, onnx, safetensors; for a causal_lm "
                                                    "teacher: hf.")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    devices: int = Field(1, ge=1, le=64, description="causal_lm: train data-parallel on this many devices (GPUs with "
                                                     "NCCL; CPU processes with gloo), one process each.")
    metadata: dict[Annotated[str, Field(max_length=64)], MetadataValue] = Field(default_factory=dict, max_length=50)
    tracking: Tracking | None = Field(None, description="Also log the job to an experiment tracker (MLflow) and "
                                                        "optionally register the student there.")
    # ---- search (jobspec/search.py, docs/search.md) ----
    search: SearchConfig | None = Field(None, description="Search students and KD hyper-parameters for the one "
                                                          "that meets a target; each trial is a child job.")

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        """Rules between fields of the spec itself (no teacher or dataset facts needed)."""
        if (self.teacher_model_id is None) == (self.teacher is None):
            raise ValueError("give the teacher as 'teacher_model_id' (an uploaded model) or as 'teacher': "
                             "{\"endpoint\": {\"url\", \"model\"}} (a served causal LM), exactly one of them")
        if len(set(self.exports)) != len(self.exports):
            raise ValueError("exports lists a format twice")
        if (self.tracking is not None and self.tracking.mlflow.register_ is not None
                and not {"onnx", "torchscript"} & set(self.exports)):
            raise ValueError("tracking.mlflow.register needs an 'onnx' or 'torchscript' export to register "
                             "(safetensors alone has no MLflow flavour)")
        kinds = [s.kind for s in self.steps]
        if self.search is not None:
            self._search_combinations(kinds)
        elif "distill" in kinds and self.student is None:
            raise ValueError("a distill step needs a 'student' (e.g. {\"family\": \"mlp\", \"hidden\": [64]}); "
                             "without one, prune/quantize steps compress the teacher itself")
        if "quantize" in kinds and any(k != "quantize" for k in kinds[kinds.index("quantize"):]):
            raise ValueError("steps after a quantize step must also be quantize steps: a quantized model cannot "
                             "be trained or pruned further (use method 'qat' to train with quantization)")
        if kinds.count("quantize") > 1:
            raise ValueError("quantize at most once per job")
        if any(k != "distill" for k in kinds) and self.dataset_id is None:
            raise ValueError("prune, quantize and generate steps read the job's 'dataset_id'")
        if self.baseline and any(k not in ("distill", "generate") for k in kinds):
            raise ValueError("baseline: only for jobs whose steps are all 'distill' (after 'generate' steps)")
        if "generate" in kinds and kinds[-1] == "generate":
            raise ValueError("a generate step makes data for the distill steps after it; add one")
        for i, step in enumerate(self.steps):
            if not isinstance(step, DistillStep):
                continue
            if step.synthesize is not None and self.input_spec is None:
                raise ValueError(f"steps[{i}].synthesize needs 'input_spec' (the teacher's input shape)")
            if step.synthesize is None and self.dataset_id is None and step.dataset_id is None:
                raise ValueError(f"steps[{i}] has no data: give 'dataset_id' (job or step) or 'synthesize'")
            if step.input_reduction is not None and i != 0:
                raise ValueError(f"steps[{i}].input_reduction: only the first step can reduce the inputs "
                                 "(it builds the student for the reduced features)")
        return self

    def _search_combinations(self, kinds: list[str]) -> None:
        """A search chooses the student of a distill job that reads a dataset; its trials run without tracking."""
        if "distill" not in kinds:
            raise ValueError("search: a search distills students, so the job needs a distill step")
        if self.student is not None:
            raise ValueError("search: the search chooses the student; leave 'student' out (name the families to "
                             "try in search.space)")
        if self.teacher is not None:
            raise ValueError("search: not available with a served teacher (teacher.endpoint)")
        if self.dataset_id is None:
            raise ValueError("search: needs the job's 'dataset_id' (trials are scored on its held-out split)")
        if self.tracking is not None:
            raise ValueError("search: 'tracking' is not available with a search yet")

    @property
    def kind(self) -> str:
        return "+".join(s.kind for s in self.steps)

    def generated_for(self, index: int) -> int | None:
        """The generate step whose completions distill step ``index`` trains on: the last one before it, when the
        step names no dataset of its own (None: it trains on a dataset)."""
        step = self.steps[index]
        if getattr(step, "dataset_id", None) is not None or step.kind != "distill":
            return None
        return next((i for i in range(index - 1, -1, -1) if self.steps[i].kind == "generate"), None)

    def step_dataset_id(self, index: int) -> str | None:
        """The dataset step ``index`` trains on: its own, else the job's (None: data-free)."""
        step = self.steps[index]
        if isinstance(step, DistillStep):
            if step.synthesize is not None:
                return None
            return step.dataset_id or self.dataset_id
        return self.dataset_id

    def heldout_dataset_id(self) -> str | None:
        """The dataset the held-out rows come from: the eval dataset, else the job's, else the first step's
        (None: data-free, scored on synthetic rows)."""
        if self.eval_dataset_id or self.dataset_id:
            return self.eval_dataset_id or self.dataset_id
        return next((d for d in (self.step_dataset_id(i) for i in range(len(self.steps))) if d), None)

    def dataset_ids(self) -> list[str]:
        """Every dataset the job reads (job-level, eval, and per-step), without duplicates."""
        ids = [self.dataset_id, self.eval_dataset_id] + [getattr(s, "dataset_id", None) for s in self.steps]
        return list(dict.fromkeys(i for i in ids if i))

    def model_ids(self) -> list[str]:
        ids = [self.teacher_model_id] if self.teacher_model_id else []
        if isinstance(self.student, UploadedStudent):
            ids.append(self.student.model_id)
        return ids
