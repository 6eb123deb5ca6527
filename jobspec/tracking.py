"""Where a job reports its run besides Distillery itself: an experiment tracker (MLflow).

``"tracking": {"mlflow": {"experiment": "digits", "run_name": "kd-mlp32", "register": {"name": "digits-student"}}}``
asks the worker to log the job as an MLflow run (params, per-epoch metrics, the report and the student files)
and, with ``register``, to add the student to the model registry as a new version of ``name``. The deployment
must have a tracking server (``DISTILLERY_MLFLOW_TRACKING_URI``), else the API refuses the job before 202.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from jobspec.base import Config

# Printable characters only: names end up in URLs, UI titles and file paths of the tracking server.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
# MLflow refuses registered-model names holding '/' or ':' (path and URI separators there), or that a path
# normalisation would change (a leading '.'); a leading space is a typo.
_MODEL_NAME = r"^[^\x00-\x1f\x7f/:.\s][^\x00-\x1f\x7f/:]*$"


class MlflowRegister(Config):
    """Add the job's student to the MLflow model registry as a new version of ``name``."""

    name: str = Field(min_length=1, max_length=250, pattern=_MODEL_NAME,
                      description="Registered model name (created when new); no '/' or ':'.")


class MlflowTracking(Config):
    """Log the job as an MLflow run in ``experiment`` (created when new)."""

    # ``register`` is spelled ``register_`` in Python (pydantic models are ABCs, whose ``register`` it would
    # shadow) and ``register`` everywhere else: requests, the stored spec, the JSON schema.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, serialize_by_alias=True)

    experiment: str = Field(min_length=1, max_length=500, pattern=_PRINTABLE,
                            description="Experiment name on the deployment's tracking server.")
    run_name: str | None = Field(None, min_length=1, max_length=250, pattern=_PRINTABLE,
                                 description="Run name; default: the job id.")
    register_: MlflowRegister | None = Field(None, alias="register", description=(
        "Register the student: ONNX flavour when the job exports ONNX, else PyTorch (TorchScript)."))


class Tracking(Config):
    """Experiment trackers the job reports to."""

    mlflow: MlflowTracking
