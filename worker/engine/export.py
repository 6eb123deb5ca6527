"""Student exports (registry ``exports``, selected by the names in ``spec.exports``).

Each exporter gets the trained student on CPU in eval mode, its architecture
dict and held-out example inputs (float32 [n, *row_shape], n <= 256), writes
file(s) into ``out_dir`` and returns :class:`ArtifactFile` entries. Every
exported model is reloaded and compared with the in-memory model before it is
accepted; any failure is ``EngineError("export_failed")``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .inspect import error_summary
from .registry import EmptyConfig, exports
from .students import from_architecture
from .types import ArtifactFile, EngineError

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

    @property
    def examples(self) -> list[torch.Tensor]:
        return [self.example] if isinstance(self.example, torch.Tensor) else list(self.example)

    @property
    def names(self) -> list[str]:
        if self.input_names:
            return list(self.input_names)
        return ["input"] if len(self.examples) == 1 else [f"input_{i}" for i in range(len(self.examples))]

    def reference(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(*self.examples)


def _verify(name: str, got: np.ndarray | torch.Tensor, want: torch.Tensor) -> None:
    got_t = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    if got_t.shape != want.shape:
        raise EngineError("export_failed", f"{name}: reloaded model output shape {list(got_t.shape)} != {list(want.shape)}")
    if not torch.allclose(got_t.float(), want.float(), atol=ATOL, rtol=RTOL):
        diff = float((got_t.float() - want.float()).abs().max())
        raise EngineError("export_failed", f"{name}: reloaded model differs from the trained one (max abs diff {diff:.3g})")


class _Exporter:
    Config = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None):
        self.config = config

    def export(self, inp: ExportInput) -> list[ArtifactFile]:
        try:
            return self._export(inp)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError("export_failed", f"{self.name} export failed: {error_summary(exc)}") from None  # type: ignore[attr-defined]

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        raise NotImplementedError


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


@exports.register("torchscript")
class TorchScriptExport(_Exporter):
    filename = "student.pt"

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        path = inp.out_dir / self.filename
        scripted = script_student(inp.model, inp.example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The architecture rides along so the archive alone can be rebuilt.
            torch.jit.save(scripted, str(path), _extra_files={"architecture.json": json.dumps(inp.architecture)})
            reloaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            _verify("torchscript", reloaded(*inp.examples), inp.reference())
        return [ArtifactFile("student", "torchscript", path, inp.step_index, OCTET)]


@exports.register("onnx")
class OnnxExport(_Exporter):
    filename = "student.onnx"
    opset = 17

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        import onnxruntime as ort

        path = inp.out_dir / self.filename
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Legacy (TorchScript-based) exporter: fast and sufficient for
            # these students; the dynamo exporter takes many seconds.
            names, out = inp.names, inp.output_name
            axes = {n: {0: "batch"} for n in names}
            axes[out] = {0: "batch"}
            torch.onnx.export(
                inp.model,
                tuple(e[:2] for e in inp.examples),
                str(path),
                dynamo=False,
                input_names=names,
                output_names=[out],
                dynamic_axes=axes,
                opset_version=self.opset,
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in session.get_inputs()}
        feeds = {n: e.numpy() for n, e in zip(inp.names, inp.examples) if n in graph_inputs}
        got = session.run([inp.output_name], feeds)[0]
        _verify("onnx", got, inp.reference())
        return [ArtifactFile("student", "onnx", path, inp.step_index, OCTET)]


@exports.register("safetensors")
class SafetensorsExport(_Exporter):
    filename = "student.safetensors"
    architecture_filename = "architecture.json"

    def _export(self, inp: ExportInput) -> list[ArtifactFile]:
        from safetensors.torch import save_file

        path = inp.out_dir / self.filename
        arch_path = inp.out_dir / self.architecture_filename
        state = {k: v.detach().cpu().contiguous() for k, v in inp.model.state_dict().items()}
        save_file(
            state,
            str(path),
            metadata={"architecture": json.dumps(inp.architecture), "format": SAFETENSORS_FORMAT},
        )
        arch_path.write_text(json.dumps(inp.architecture, indent=2, sort_keys=True))
        try:
            rebuilt = load_safetensors_student(path).eval()
        except EngineError as exc:
            if exc.code != "unsupported":
                raise
            # Not a built-in family (an uploaded TorchScript/torch.export student): verify the
            # weights by loading them back into a copy of the trained module.
            import copy

            from safetensors.torch import load_file

            rebuilt = copy.deepcopy(inp.model)
            rebuilt.load_state_dict(load_file(str(path)))
            rebuilt.eval()
        with torch.inference_mode():
            _verify("safetensors", rebuilt(*inp.examples), inp.reference())
        return [
            ArtifactFile("student", "safetensors", path, inp.step_index, OCTET),
            ArtifactFile("architecture", "json", arch_path, inp.step_index, JSON),
        ]


def load_safetensors_student(path: Path) -> nn.Module:
    """Rebuild a student from a safetensors file written by :class:`SafetensorsExport`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != SAFETENSORS_FORMAT or "architecture" not in metadata:
        raise EngineError("invalid_model", f"{path.name} is not a {SAFETENSORS_FORMAT} safetensors file")
    model = from_architecture(json.loads(metadata["architecture"]))
    model.load_state_dict(load_file(str(path)))
    return model
