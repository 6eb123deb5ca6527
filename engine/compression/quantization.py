"""Post-training and quantization-aware quantization, measured and saveable.

``quantize(model, config, *, calibration, example_inputs, train_fn=None) -> QuantResult``
with config ``{"method": ...}`` (registry ``quantizers``, discriminator ``method``):

| method          | how (torch 2.13)                                                        | saved as               |
|-----------------|--------------------------------------------------------------------------|------------------------|
| ``dynamic_int8``| ``torch.ao.quantization.quantize_dynamic`` (Linear/LSTM/GRU, qint8)       | TorchScript (script/trace) |
| ``static_int8`` | FX graph mode: ``prepare_fx`` -> calibrate -> ``convert_fx`` with the    | TorchScript (trace)    |
|                 | ``x86`` (default) / ``fbgemm`` / ``qnnpack`` default qconfig mapping      |                        |
| ``fp16``/``bf16``| weights cast; :class:`CastWrapper` casts float32 inputs in, outputs back | TorchScript            |
| ``onnx_int8``   | ONNX Runtime ``quantize_dynamic`` / ``quantize_static`` (QDQ), see       | ``.onnx`` file         |
|                 | :func:`quantize_onnx`; ``quantize()`` exports the model first            |                        |
| ``qat``         | FX ``prepare_qat_fx`` -> ``train_fn(model)`` -> ``convert_fx``           | TorchScript (trace)    |

PT2E (``prepare_pt2e``/``convert_pt2e``, ``X86InductorQuantizer``) is not in
torch 2.13 (``torch.ao.quantization.quantize_pt2e`` and
``torch.ao.quantization.quantizer`` were moved to the separate ``torchao``
package, which this layer does not import), so static/QAT use FX graph mode,
which still works in 2.13 (it emits DeprecationWarnings).

CPU notes: int8 kernels (fbgemm/x86/onednn) are fast on x86 CPUs with AVX2/VNNI.
fp16 on CPU halves the file size but is usually *slower* than fp32 (few CPUs have
native fp16 GEMM; PyTorch upcasts internally); bf16 is fast only on CPUs with
AVX512-BF16/AMX, otherwise also slower. Both are mainly for size or GPU serving.

``Config`` of every quantizer is the spec's :class:`jobspec.QuantizeStep`; knobs the spec does not expose
(FX backend, calibration batches, QAT epochs) are :class:`QuantizeOptions`.

References: B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam, D. Kalenichenko,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018
(affine int8, calibration, quantization-aware training with fake quantization); R. Krishnamoorthi,
"Quantizing deep convolutional networks for efficient inference: A whitepaper", arXiv:1806.08342, 2018
(dynamic vs static post-training quantization, per-channel weights).
"""

from __future__ import annotations

import copy
import io
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

import jobspec
import jobspec.base
from engine.compression.onnx_quantization import Quiet, export_onnx, quantize_onnx
from engine.registry import Registry
from engine.errors import InvalidSpec, Unsupported

quantizers: Registry[Any] = Registry("quantizer", key="method")


@dataclass(frozen=True)
class QuantizeOptions:
    """Algorithm knobs the job spec does not expose (the pipeline sets them; the step's options are the
    spec's :class:`jobspec.QuantizeStep`): dynamic-int8 layer types, FX backend, calibration batches, QAT
    epochs."""

    layers: tuple[str, ...] = ("linear", "lstm", "gru")
    backend: Literal["x86", "fbgemm", "qnnpack"] = "x86"
    calibration_batches: int = 32
    epochs: int = 1

    def __post_init__(self) -> None:
        if not set(self.layers) <= {"linear", "lstm", "gru"}:
            raise InvalidSpec("quantize layers: only linear, lstm, gru")
        if self.calibration_batches < 1 or self.epochs < 1:
            raise InvalidSpec("quantize: calibration_batches and epochs must be >= 1")


@dataclass
class QuantResult:
    """``model``: runnable on CPU, takes the same float32 inputs as the original
    (None for ``onnx_int8``, whose result is ``path``). ``format_notes``: how it is
    saved / what to expect. ``save_as``: ``"torchscript_trace"``, ``"torchscript"`` or ``"onnx"``."""

    model: nn.Module | None
    format_notes: str
    method: str
    save_as: str = "torchscript_trace"
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------- helpers


def to_torchscript(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> torch.jit.ScriptModule:
    """Trace (with ``example_inputs``) or else script ``model``; ScriptModules pass through."""
    if isinstance(model, torch.jit.ScriptModule):
        return model
    model.eval()
    with Quiet(), torch.no_grad():
        if example_inputs is not None:
            return torch.jit.trace(model, tuple(example_inputs), check_trace=False)
        return torch.jit.script(model)


def torchscript_bytes(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> bytes:
    buf = io.BytesIO()
    with Quiet():
        torch.jit.save(to_torchscript(model, example_inputs), buf)
    return buf.getvalue()


def save_torchscript(model: nn.Module, path: str | os.PathLike, example_inputs: Sequence[torch.Tensor] | None = None) -> Path:
    path = Path(path)
    path.write_bytes(torchscript_bytes(model, example_inputs))
    return path


def load_torchscript(path_or_bytes: str | os.PathLike | bytes) -> torch.jit.ScriptModule:
    with Quiet():
        if isinstance(path_or_bytes, bytes):
            return torch.jit.load(io.BytesIO(path_or_bytes), map_location="cpu")
        return torch.jit.load(str(path_or_bytes), map_location="cpu")


def size_bytes(model_or_path: Any, example_inputs: Sequence[torch.Tensor] | None = None) -> int:
    """File size for a path (ONNX, TorchScript, ...); serialized TorchScript size for a module."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return Path(model_or_path).stat().st_size
    if isinstance(model_or_path, QuantResult):
        if model_or_path.path is not None:
            return size_bytes(model_or_path.path)
        model_or_path = model_or_path.model
    return len(torchscript_bytes(model_or_path, example_inputs))


def _batches(calibration: Iterable[Sequence[torch.Tensor]] | None, limit: int) -> Iterator[tuple[torch.Tensor, ...]]:
    if calibration is None:
        return iter(())
    return (tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in itertools.islice(calibration, limit))


# ----------------------------------------------------------------------- plugins


class _Quantizer:
    """A quantization method: ``config`` is the spec's step, ``options`` the knobs it does not expose."""

    Config = jobspec.QuantizeStep

    def __init__(self, config: jobspec.QuantizeStep, options: QuantizeOptions):
        self.config = config
        self.options = options


def _fx_quantize(what: str, prepare: Callable, mapping: Any, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                 fill: Callable[[nn.Module], None]) -> nn.Module:
    """FX graph mode: ``prepare(model, mapping, example)`` inserts observers (or fake quantization),
    ``fill(prepared)`` calibrates or trains them, ``convert_fx`` makes the int8 model."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with Quiet():
        try:
            prepared = prepare(model, mapping, tuple(example_inputs))
        except Exception as exc:  # noqa: BLE001
            raise Unsupported(f"{what}: FX cannot trace this model ({type(exc).__name__}: {exc})") from None
        fill(prepared)
        return convert_fx(prepared)


@quantizers.register("dynamic_int8")
class DynamicInt8(_Quantizer):
    """Weights int8 ahead of time, activations quantized on the fly per batch."""


    def run(self, model: nn.Module, **_: Any) -> QuantResult:
        types = {"linear": nn.Linear, "lstm": nn.LSTM, "gru": nn.GRU}
        with Quiet():
            q = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(model).eval(), {types[n] for n in self.options.layers}, dtype=torch.qint8
            )
        return QuantResult(
            q, "int8 weights, dynamic int8 activations (fbgemm/x86); saves with torch.jit.trace or script", "dynamic_int8"
        )


def _fx_engine(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise Unsupported(f"quantized engine {backend!r} not available here")
    torch.backends.quantized.engine = backend


@quantizers.register("static_int8")
class StaticInt8(_Quantizer):
    """FX graph mode post-training static quantization with calibration."""


    def run(self, model: nn.Module, *, calibration=None, example_inputs=None, **_: Any) -> QuantResult:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        if calibration is None:
            raise InvalidSpec("static_int8 needs calibration data")
        _fx_engine(self.options.backend)
        seen: list[int] = []  # calibration batches run (a list: TorchScript's parser refuses ``nonlocal``)

        def calibrate(prepared: nn.Module) -> None:
            with torch.no_grad():
                for batch in _batches(calibration, self.options.calibration_batches):
                    prepared(*batch)
                    seen.append(1)
            if not seen:
                raise InvalidSpec("static_int8: calibration data is empty")

        q = _fx_quantize("static_int8", prepare_fx, get_default_qconfig_mapping(self.options.backend),
                         copy.deepcopy(model).eval(), example_inputs, calibrate)
        return QuantResult(
            q,
            f"int8 weights and activations, FX graph mode, {self.options.backend} engine, {len(seen)} calibration batches; "
            "saves with torch.jit.trace (set torch.backends.quantized.engine to the same engine to run)",
            "static_int8",
        )


class CastWrapper(nn.Module):
    """Runs ``inner`` in ``dtype``: floating inputs are cast in, the output is cast back to float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.inner(x).float()


@quantizers.register("fp16")
class FP16(_Quantizer):
    dtype = torch.float16
    note = "float16 weights (half the size); on most CPUs slower than float32 (no native fp16 GEMM)"

    def run(self, model: nn.Module, **_: Any) -> QuantResult:
        return QuantResult(CastWrapper(copy.deepcopy(model).eval(), self.dtype).eval(), self.note, self.name, "torchscript")  # type: ignore[attr-defined]


@quantizers.register("bf16")
class BF16(FP16):
    dtype = torch.bfloat16
    note = "bfloat16 weights (half the size); fast only on CPUs with AVX512-BF16/AMX, otherwise slower than float32"


@quantizers.register("qat")
class QAT(_Quantizer):
    """FX quantization-aware training: fake-quant modules are inserted, ``train_fn(model)``
    fine-tunes the prepared model in place (the pipeline's KD loop; ``epochs`` is for it),
    then the model is converted to int8 like ``static_int8``."""


    def run(self, model: nn.Module, *, example_inputs=None, train_fn=None, **_: Any) -> QuantResult:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        if train_fn is None:
            raise InvalidSpec("qat needs a train_fn(model) callback")
        _fx_engine(self.options.backend)

        def train(prepared: nn.Module) -> None:
            prepared.train()
            train_fn(prepared)
            prepared.eval()

        q = _fx_quantize("qat", prepare_qat_fx, get_default_qat_qconfig_mapping(self.options.backend),
                         copy.deepcopy(model).train(), example_inputs, train)
        return QuantResult(
            q, f"int8 after quantization-aware training (FX, {self.options.backend}); saves with torch.jit.trace", "qat"
        )


@quantizers.register("onnx_int8")
class OnnxInt8(_Quantizer):
    """ONNX Runtime quantization of an ONNX file (see :func:`quantize_onnx`)."""


    def run(self, model: nn.Module, *, calibration=None, example_inputs=None, work_dir=None, **_: Any) -> QuantResult:
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="distillery-onnx-"))
        fp32 = work / "model_fp32.onnx"
        out = work / "model_int8.onnx"
        export_onnx(model, fp32, example_inputs)
        feeds = None
        if self.config.mode == "static":
            if calibration is None:
                raise InvalidSpec("onnx_int8 static needs calibration data")
            feeds = [{"input": b[0].numpy()} for b in _batches(calibration, self.options.calibration_batches)]
        quantize_onnx(fp32, out, self.config.mode, feeds)
        return QuantResult(None, f"ONNX Runtime int8 ({self.config.mode}, QDQ for static)", "onnx_int8", "onnx", out)


# ---------------------------------------------------------------------------- API


def quantize(
    model: nn.Module,
    config: Mapping[str, Any] | jobspec.QuantizeStep,
    *,
    calibration: Iterable[Sequence[torch.Tensor]] | None = None,
    example_inputs: Sequence[torch.Tensor],
    train_fn: Callable[[nn.Module], Any] | None = None,
    work_dir: str | os.PathLike | None = None,
) -> QuantResult:
    """Quantize an eager ``model`` (TorchScript / torch.export models: rebuild them with
    ``editable.to_editable`` first). The input model is not modified."""
    options = QuantizeOptions()
    described = config.model_dump(mode="json") if isinstance(config, jobspec.QuantizeStep) else dict(config)
    if not isinstance(config, jobspec.QuantizeStep):
        raw = dict(config)
        knobs = {k: raw.pop(k) for k in ("layers", "backend", "calibration_batches", "epochs") if k in raw}
        options = QuantizeOptions(**{k: tuple(v) if k == "layers" else v for k, v in knobs.items()})
        try:
            config = jobspec.QuantizeStep.model_validate(raw)
        except ValidationError as exc:
            raise InvalidSpec(f"quantize: {jobspec.base.validation_message(exc)}") from None
    q = quantizers.get(config.method)(config, options)
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        from engine.compression.editable import to_editable

        model = to_editable(model, example_inputs)
    result = q.run(model, calibration=calibration, example_inputs=tuple(example_inputs), train_fn=train_fn, work_dir=work_dir)
    result.config = described
    return result
