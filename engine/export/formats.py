"""Student exports (registry ``exports``, selected by the names in ``spec.exports``).

Each exporter gets the trained student on CPU in eval mode, its architecture
dict and held-out example inputs (float32 [n, *row_shape], n <= 256), writes
file(s) into ``out_dir`` and returns :class:`ArtifactFile` entries. Every
exported model is reloaded and compared with the in-memory model before it is
accepted; any failure is ``EngineError("export_failed")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import error_summary
from engine.registry import exports
from engine.report.timings import phase
from engine.students.architecture import from_architecture
from engine.values import ArtifactFile
from engine.errors import EngineError, ExportFailed, InvalidModel

OCTET = "application/octet-stream"
JSON = "application/json"
SAFETENSORS_FORMAT = "distillery-student/1"
ATOL = 1e-4
RTOL = 1e-4


@dataclass
class ExportInput:
    model: nn.Module  # CPU, eval mode
    architecture: dict[str, Any]
    example: Any  # CPU tensor [n, *row_shape], or a list of tensors (one per input, float32/int64)
    out_dir: Path
    step_index: int
    input_names: list[str] | None = None  # ONNX input names (the dataset's input names)
    output_name: str = "logits"
    #: prefix of the file names (``step1_`` in multi-step jobs)
    prefix: str = ""
    task: str = "classification"
    #: how closely a reloaded export must match ``model``: "float" (1e-4), "half" (fp16/bf16), "int8"
    tolerance: str = "float"
    #: export name -> why it is skipped for this model (an ``export`` event, no file)
    skip: dict[str, str] = field(default_factory=dict)
    #: ONNX for models torch.onnx cannot export directly (see :class:`OnnxExport`)
    onnx_plan: dict[str, Any] | None = None
    #: safetensors: save this float module's weights (in ``safetensors_dtype``) instead of ``model``'s
    safetensors_model: nn.Module | None = None
    safetensors_dtype: Any = None
    #: filled by exporters: notes for the report (e.g. how the ONNX was made)
    notes: dict[str, str] = field(default_factory=dict)
    #: ``model`` already saved as TorchScript (with :func:`torchscript_extra_files`): written as is
    torchscript_bytes: bytes | None = None
    _reference: Any = field(default=None, init=False, repr=False)

    @property
    def examples(self) -> list[torch.Tensor]:
        return [self.example] if isinstance(self.example, torch.Tensor) else list(self.example)

    @property
    def names(self) -> list[str]:
        if self.input_names:
            return list(self.input_names)
        return ["input"] if len(self.examples) == 1 else [f"input_{i}" for i in range(len(self.examples))]

    def reference(self) -> torch.Tensor:
        """The in-memory model's outputs on the examples, computed once for every format's check."""
        if self._reference is None:
            with torch.inference_mode():
                self._reference = self.model(*self.examples)
        return self._reference


class SkipExport(Exception):
    """An export that does not apply to this step's model (the pipeline reports it as an event)."""


#: tolerance -> (min argmax agreement, max mean |diff| relative to mean |reference|)
TOLERANCES = {"half": (0.99, 0.05), "int8": (0.95, 0.15)}


def _verify(name: str, got: np.ndarray | torch.Tensor, want: torch.Tensor, tolerance: str = "float",
            task: str = "classification") -> None:
    """Reloaded vs in-memory outputs. ``float``: allclose(1e-4); ``half``/``int8``: argmax agreement
    (classification) and mean relative deviation within :data:`TOLERANCES`."""
    got_t = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    if got_t.shape != want.shape:
        raise ExportFailed(f"{name}: reloaded model output shape {list(got_t.shape)} != {list(want.shape)}")
    got_t, want = got_t.float(), want.float()
    if tolerance == "float":
        if not torch.allclose(got_t, want, atol=ATOL, rtol=RTOL):
            diff = float((got_t - want).abs().max())
            raise ExportFailed(f"{name}: reloaded model differs from the trained one (max abs diff {diff:.3g})")
        return
    min_agree, max_rel = TOLERANCES[tolerance]
    if task == "classification" and want.dim() == 2 and want.shape[1] > 1:
        agree = float((got_t.argmax(1) == want.argmax(1)).float().mean())
        if agree < min_agree:
            raise ExportFailed(f"{name}: reloaded model agrees with the in-memory {tolerance} model on "
                              f"only {agree:.3f} of held-out rows (needs {min_agree})")
    rel = float((got_t - want).abs().mean()) / (float(want.abs().mean()) + 1e-6)
    if rel > max_rel:
        raise ExportFailed(f"{name}: reloaded model deviates from the in-memory {tolerance} model by "
                          f"{rel:.3f} (mean relative difference, allowed {max_rel})")


class _Exporter(ABC):
    def export(self, inp: ExportInput) -> list[ArtifactFile]:
        reason = inp.skip.get(self.name)  # type: ignore[attr-defined]
        if reason:
            raise SkipExport(reason)
        try:
            return self._export(inp)
        except (EngineError, SkipExport):
            raise
        except Exception as exc:
            raise ExportFailed(f"{self.name} export failed: {error_summary(exc)}") from None  # type: ignore[attr-defined]

    @abstractmethod
    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        """Write the student in this format into ``inp.out_dir``, verify it, return its artifact files."""


def script_student(model: nn.Module, example: Any) -> torch.jit.ScriptModule:
    """TorchScript of the student: scripted if possible, traced otherwise (``example``: tensor or list)."""
    examples = [example] if isinstance(example, torch.Tensor) else list(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, torch.jit.ScriptModule):
            return model
        try:
            return torch.jit.script(model)
        except Exception:
            return torch.jit.trace(model, tuple(e[:2] for e in examples), check_trace=False)


def torchscript_extra_files(architecture: Mapping[str, Any]) -> dict[str, str]:
    """The files a TorchScript student archive carries: its architecture, so the archive alone can be rebuilt."""
    return {"architecture.json": json.dumps(architecture)}


@exports.register("torchscript")
class TorchScriptExport(_Exporter):
    filename = "student.pt"

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        path = inp.out_dir / (inp.prefix + self.filename)
        if inp.torchscript_bytes is not None:  # already scripted and saved when the step's row was measured
            path.write_bytes(inp.torchscript_bytes)
        else:
            scripted = script_student(inp.model, inp.example)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(scripted, str(path), _extra_files=torchscript_extra_files(inp.architecture))
        with phase("verify"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reloaded = torch.jit.load(str(path), map_location="cpu")
            with torch.inference_mode():
                _verify("torchscript", reloaded(*inp.examples), inp.reference(), inp.tolerance, inp.task)
        return [ArtifactFile("student", "torchscript", path, inp.step_index, OCTET)]


@exports.register("onnx")
class OnnxExport(_Exporter):
    filename = "student.onnx"
    opset = 17

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        path = inp.out_dir / (inp.prefix + self.filename)
        plan = inp.onnx_plan or {}
        if plan.get("file") is not None:
            # the step's output already is an ONNX model (quantize onnx_int8)
            shutil.copyfile(plan["file"], path)
            with phase("verify"):
                session = ort_session(path)
                feeds = {i.name: e.numpy() for i, e in zip(session.get_inputs(), inp.examples)}
                got = session.run(None, feeds)[0]
        else:
            source = plan.get("float_model", inp.model)
            mode = plan.get("mode")
            target = path if mode is None else inp.out_dir / (inp.prefix + "float-" + self.filename)
            export_onnx_file(source, target, inp.examples, inp.names, inp.output_name, self.opset)
            if mode is not None:
                from engine.compression.onnx_quantization import quantize_onnx

                calibration = plan.get("calibration")
                quantize_onnx(target, path, mode, calibration)
                target.unlink()
            if plan.get("note"):
                inp.notes["onnx"] = plan["note"]
            with phase("verify"):
                session = ort_session(path)
                graph_inputs = {i.name for i in session.get_inputs()}
                feeds = {n: e.numpy() for n, e in zip(inp.names, inp.examples) if n in graph_inputs}
                got = session.run([inp.output_name], feeds)[0]
        with phase("verify"):
            _verify("onnx", got, inp.reference(), inp.tolerance, inp.task)
        return [ArtifactFile("student", "onnx", path, inp.step_index, OCTET)]


def export_onnx_file(model: nn.Module, path: Path, examples: list[torch.Tensor], names: list[str], output_name: str,
                     opset: int = 17) -> Path:
    """Legacy (TorchScript-based) ONNX export with a dynamic batch axis: fast and sufficient for
    these students (the dynamo exporter takes many seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {n: {0: "batch"} for n in names}
        axes[output_name] = {0: "batch"}
        torch.onnx.export(
            model.eval(),
            tuple(e[:2] for e in examples),
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=[output_name],
            dynamic_axes=axes,
            opset_version=opset,
        )
    return path


def ort_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@exports.register("safetensors")
class SafetensorsExport(_Exporter):
    filename = "student.safetensors"
    architecture_filename = "architecture.json"

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        from safetensors.torch import save_file

        path = inp.out_dir / (inp.prefix + self.filename)
        arch_path = inp.out_dir / (inp.prefix + self.architecture_filename)
        source = inp.safetensors_model if inp.safetensors_model is not None else inp.model
        dtype = inp.safetensors_dtype
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in source.state_dict().items()}
        save_file(
            state,
            str(path),
            metadata={"architecture": json.dumps(inp.architecture), "format": SAFETENSORS_FORMAT},
        )
        arch_path.write_text(json.dumps(inp.architecture, indent=2, sort_keys=True))
        with phase("verify"):
            self._check_reload(inp, path, source)
        return [
            ArtifactFile("student", "safetensors", path, inp.step_index, OCTET),
            ArtifactFile("architecture", "json", arch_path, inp.step_index, JSON),
        ]

    @staticmethod
    def _check_reload(inp: ExportInput, path: Path, source: nn.Module) -> None:
        """Rebuild the student from ``path`` and compare it with the trained one."""
        try:
            rebuilt = load_safetensors_student(path).eval()
        except EngineError as exc:
            if exc.code != "unsupported":
                raise
            # Not a built-in family (an uploaded TorchScript/torch.export student): verify the
            # weights by loading them back into a copy of the trained module.
            import copy

            from safetensors.torch import load_file

            rebuilt = copy.deepcopy(source)
            rebuilt.load_state_dict(load_file(str(path)))
            rebuilt.eval()
        with torch.inference_mode():
            _verify("safetensors", rebuilt(*inp.examples), inp.reference(), inp.tolerance, inp.task)


def load_safetensors_student(path: Path) -> nn.Module:
    """Rebuild a student from a safetensors file written by :class:`SafetensorsExport`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != SAFETENSORS_FORMAT or "architecture" not in metadata:
        raise InvalidModel(f"{path.name} is not a {SAFETENSORS_FORMAT} safetensors file")
    model = from_architecture(json.loads(metadata["architecture"]))
    model.load_state_dict(load_file(str(path)))
    return model
