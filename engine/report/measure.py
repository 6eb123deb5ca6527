"""Report rows for models: parameter counts, shipped size (+ gzip), CPU latency, metrics.

Students are measured on a CPU copy in eval mode, sized as the bytes a user would ship (the
TorchScript archive, or the ONNX file for ONNX Runtime models); the teacher's extras add its
non-zero parameter count and gzip size. Also the one-line metric summaries used in events.
"""

from __future__ import annotations

import copy
import gzip
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.devices import is_cpu_only
from engine.steps import compress as compress_mod
from engine.export import formats as export_mod
from engine.students import common
from engine.metrics import METRIC_KEYS
from engine.report.rows import measure_latency, model_row
from engine.training.context import TrainContext
from engine.values import TeacherSource
from engine.pipeline.validate import Validated


def student_size_bytes(model: nn.Module, example: list[torch.Tensor]) -> int:
    """Size of the student as shipped (see :func:`_serialized`); raw tensor bytes if it cannot be serialized."""
    data = _serialized(model, example)
    return len(data) if data is not None else common.state_dict_bytes(model)


def cpu_eval_copy(model: nn.Module) -> nn.Module:
    """``model`` in eval mode on the CPU (a copy when it lives on another device)."""
    model = model.eval()
    params = list(model.parameters())
    if not params or params[0].device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu().eval()


def _to_tensors(batch: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
    out = []
    for v in batch.values():
        v = np.asarray(v)
        v = v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(v)))
    return out


def student_latency(model: nn.Module, x: Mapping[str, np.ndarray]) -> dict[str, float]:
    """CPU latency of ``model`` on batches of ``x`` (see :func:`.report.measure_latency`)."""
    cpu_model = cpu_eval_copy(model)

    def make(batch: Mapping[str, np.ndarray]):
        ts = _to_tensors(batch)

        def call():
            with torch.inference_mode():
                return cpu_model(*ts)

        return call

    return measure_latency(make, x)


def _serialized(model: nn.Module, example: list[torch.Tensor],
                architecture: Mapping[str, Any] | None = None) -> bytes | None:
    """The bytes a user would ship: the ONNX file for ONNX Runtime models, else TorchScript (with
    ``architecture`` the exact bytes of the ``torchscript`` export, which then writes them)."""
    if isinstance(model, compress_mod.OrtModule):
        return model.path.read_bytes()
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = export_mod.script_student(model, example)
            if architecture is None:
                torch.jit.save(scripted, buffer)
            else:
                torch.jit.save(scripted, buffer, _extra_files=export_mod.torchscript_extra_files(architecture))
        return buffer.getvalue()
    except Exception:
        return None


def gzip_size(data: bytes) -> int:
    """Bytes after gzip level 6 (no timestamp, so the size is reproducible)."""
    return len(gzip.compress(data, compresslevel=6, mtime=0))


def measure_row(ctx: TrainContext, example: list[torch.Tensor], val_x: Mapping[str, np.ndarray],
             metrics: Mapping[str, float]) -> tuple[dict[str, Any], bytes | None]:
    """A report row for the current model: counts, serialized (+ gzip) size, CPU latency, metrics; and the
    TorchScript bytes it was sized by (the ``torchscript`` export writes them: the model is scripted once)."""
    cpu_model = cpu_eval_copy(ctx.student)
    total, nonzero = compress_mod.parameter_counts(cpu_model)
    data = _serialized(cpu_model, example, ctx.architecture)
    size = len(data) if data is not None else common.state_dict_bytes(cpu_model)
    row = model_row(total, size, student_latency(cpu_model, val_x), metrics)
    row["nonzero_parameters"] = int(nonzero)
    row["size_gzip_bytes"] = gzip_size(data) if data is not None else None
    ctx.student.to(ctx.device) if not is_cpu_only(ctx.student) else None
    return row, (data if data is not None and not isinstance(cpu_model, compress_mod.OrtModule) else None)


def teacher_extras(v: Validated, source: TeacherSource) -> dict[str, Any]:
    """``format`` and ``nonzero_parameters`` of the teacher (its ``size_gzip_bytes`` is side work:
    :func:`engine.report.background.teacher_gzip_size`)."""
    out: dict[str, Any] = {"format": v.teacher.format}
    try:
        if v.teacher.module is not None:
            out["nonzero_parameters"] = int(sum(int(torch.count_nonzero(p.detach()))
                                                for p in v.teacher.module.parameters())) or None
        else:
            out["nonzero_parameters"] = compress_mod.OrtModule(Path(source.path)).counts()[1]
    except Exception:  # noqa: BLE001
        out["nonzero_parameters"] = None
    return out


def times(ratio: float | None) -> str:
    """A ratio as ``"3.2x"`` (``"n/a"`` when unknown)."""
    return "n/a" if ratio is None else f"{ratio:.1f}x"


def describe(metrics: Mapping[str, Any]) -> str:
    """``"accuracy 0.9512, agreement 0.9731"``: the metrics an event message names."""
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS if k in metrics)
