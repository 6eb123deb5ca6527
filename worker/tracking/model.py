"""The job's student as an MLflow model directory, built without opening the student file.

The student was written by the sandboxed executor, so this trusted process treats it as opaque bytes: it is
copied into the directory, and the ``MLmodel`` file around it is written from facts the worker already
holds — the report's input shapes and output width (JSON), and the input dtypes the upload inspector
recorded for the dataset. Flavours: ``onnx`` (loaded with onnxruntime, ``mlflow.onnx`` / pyfunc) when the
job exported ONNX, else ``pytorch`` (the TorchScript archive, ``mlflow.pytorch`` / pyfunc). Both carry a
tensor signature: ``(-1, *row_shape)`` per input, ``(-1, output_width)`` out.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.values import ArtifactFile

#: Student formats that become a registered model, best first.
FLAVOURS = {"onnx": "onnx", "torchscript": "pytorch"}


@dataclass(frozen=True)
class ModelFacts:
    """What the signature says. ``inputs``: per-row shape of each input, in the model's positional order;
    ``dtypes``: numpy dtype name per input (``int64`` for token ids and masks, else ``float32``)."""

    inputs: dict[str, list[int]]
    dtypes: dict[str, str]
    output_name: str
    output_width: int | None


def model_facts(report: Mapping[str, Any], dataset_arrays: Mapping[str, Any] | None) -> ModelFacts:
    """Facts from ``report.json``'s ``data`` section and a dataset's recorded ``schema.arrays``
    (``{name: {"shape", "dtype"}}``; None for data-free jobs, whose inputs are float)."""
    data = report.get("data") or {}
    inputs = {str(k): [int(d) for d in v] for k, v in (data.get("inputs") or {}).items()}
    if not inputs and data.get("input_shape"):
        inputs = {"x": [int(d) for d in data["input_shape"]]}
    arrays = dataset_arrays or {}
    dtypes = {}
    for name in inputs:
        recorded = str((arrays.get(name) or {}).get("dtype", "float32"))
        # The engine keeps integer inputs as int64 and casts every other input to float32.
        dtypes[name] = "int64" if recorded.startswith(("int", "uint")) else "float32"
    width = data.get("output_width")
    return ModelFacts(inputs=inputs, dtypes=dtypes,
                      output_name="logits" if data.get("task") == "classification" else "output",
                      output_width=int(width) if isinstance(width, int) else None)


def final_student(artifacts: list[ArtifactFile]) -> ArtifactFile | None:
    """The file to register: the last step's student, ONNX when it was exported, else TorchScript."""
    students = [a for a in artifacts if a.kind == "student" and a.format in FLAVOURS]
    if not students:
        return None
    last = max(a.step_index or 0 for a in students)
    finals = [a for a in students if (a.step_index or 0) == last]
    return min(finals, key=lambda a: list(FLAVOURS).index(a.format))


def signature(facts: ModelFacts, *, named: bool = True) -> Any:
    """The tensor signature. ``named=False`` leaves a single input unnamed: the pytorch flavour's pyfunc takes a
    plain array, and MLflow turns an array into a dict for a named input."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    unnamed = not named and len(facts.inputs) == 1
    inputs = Schema([TensorSpec(np.dtype(facts.dtypes[name]), (-1, *shape), None if unnamed else name)
                     for name, shape in facts.inputs.items()])
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, facts.output_width or -1), facts.output_name)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def write_model(student: ArtifactFile, facts: ModelFacts, out: Path, *, run_id: str) -> str:
    """Build the MLflow model directory ``out`` around ``student``; returns its flavour."""
    import yaml
    from mlflow import pyfunc
    from mlflow.models import Model

    flavour = FLAVOURS[student.format]
    out.mkdir(parents=True)
    model = Model(run_id=run_id, artifact_path="model", signature=signature(facts, named=flavour == "onnx"))
    if flavour == "onnx":
        shutil.copyfile(student.path, out / "model.onnx")
        pyfunc.add_to_model(model, loader_module="mlflow.onnx", data="model.onnx", python_env="python_env.yaml")
        # CUDA first where the consumer has it, like mlflow.onnx.save_model's default.
        model.add_flavor("onnx", onnx_version=_version("onnx"), data="model.onnx",
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"], code=None)
        requirements = ["mlflow", "onnx", "onnxruntime"]
    else:
        (out / "data").mkdir()
        # A TorchScript archive under the name mlflow.pytorch loads (torch.load hands such archives to
        # torch.jit.load); the pickle-module file is what its loader reads first.
        shutil.copyfile(student.path, out / "data" / "model.pth")
        (out / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")
        pyfunc.add_to_model(model, loader_module="mlflow.pytorch", data="data", python_env="python_env.yaml",
                            pickle_module_name="mlflow.pytorch.pickle_module", model_config={"device": None})
        model.add_flavor("pytorch", model_data="data", pytorch_version=importlib.metadata.version("torch"), code=None)
        requirements = ["mlflow", "torch"]
    pins = [f"{name}=={_version(name)}" for name in requirements]
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    (out / "python_env.yaml").write_text(yaml.safe_dump({"python": platform.python_version(),
                                                         "build_dependencies": ["pip"],
                                                         "dependencies": ["-r requirements.txt"]}))
    model.save(str(out / "MLmodel"))
    return flavour


def _version(dist: str) -> str:
    # importlib.metadata, not the module: this process never needs to import onnx or torch for the MLmodel.
    return importlib.metadata.version(dist).split("+")[0]
