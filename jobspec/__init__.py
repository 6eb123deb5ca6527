"""The job spec, defined once: pydantic models imported by the API (request validation, capabilities)
and by the engine (the stored spec it runs). Torch-free and service-free: this package imports pydantic
and the standard library only (``tests/test_layers.py``).

Modules: :mod:`.base` (strict base model, format and task names), :mod:`.losses`, :mod:`.training`
(optimizer, schedule, early stopping, augmentation), :mod:`.data` (synthesis, coreset, input reduction,
input shape), :mod:`.students`, :mod:`.steps`, :mod:`.job` (:class:`JobSpec` and its field-combination
rules), :mod:`.rules` (rules against the teacher's and datasets' facts), :mod:`.tracking` (experiment trackers),
:mod:`.capabilities`.
"""

from jobspec.base import DATASET_FORMATS, EXPORT_FORMATS, MODEL_FORMATS, TASKS, Config
from jobspec.capabilities import capabilities
from jobspec.data import Coreset, InputReduction, InputSpec, Synthesize
from jobspec.job import JobSpec
from jobspec.losses import LOSSES, CosineLoss, HardLoss, Hint, KDLoss, MSELoss, SoftCELoss, TokenKDLoss
from jobspec.rules import Conflict, Facts, conflicts
from jobspec.steps import STEP_KINDS, DistillStep, Finetune, Gate, GenerateStep, PruneStep, QuantizeStep
from jobspec.students import (
    STUDENT_FAMILIES,
    CNNStudent,
    DeriveRatios,
    DerivedStudent,
    EmbeddingBagStudent,
    HFCausalLMStudent,
    MLPStudent,
    ResNetStudent,
    TextTransformerStudent,
    UploadedStudent,
)
from jobspec.tracking import MlflowRegister, MlflowTracking, Tracking
from jobspec.training import OPTIMIZERS, SCHEDULES, Augment, EarlyStopping, OptimizerConfig, ScheduleConfig

__all__ = [
    "DATASET_FORMATS", "EXPORT_FORMATS", "MODEL_FORMATS", "TASKS", "Config", "capabilities", "Coreset",
    "InputReduction", "InputSpec", "Synthesize", "JobSpec", "LOSSES", "CosineLoss", "HardLoss", "Hint", "KDLoss",
    "MSELoss", "SoftCELoss",
    "TokenKDLoss", "HFCausalLMStudent", "Conflict", "Facts", "conflicts", "STEP_KINDS", "DistillStep", "Finetune", "Gate",
    "GenerateStep",
    "PruneStep", "QuantizeStep", "STUDENT_FAMILIES", "CNNStudent", "DeriveRatios", "DerivedStudent",
    "EmbeddingBagStudent", "MLPStudent", "ResNetStudent", "TextTransformerStudent", "UploadedStudent",
    "OPTIMIZERS", "SCHEDULES", "Augment", "EarlyStopping", "OptimizerConfig", "ScheduleConfig", "MlflowRegister",
    "MlflowTracking", "Tracking",
]
