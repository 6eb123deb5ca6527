"""Teacher models behind one interface (registry ``teacher_formats``).

``load_teacher(source, device)`` returns a :class:`Teacher`; calling it on a
batch (numpy array or tensor, [B, *row_shape]) returns float32 logits
[B, C] on the engine device. TorchScript teachers run in torch under
``inference_mode``; ONNX teachers run in onnxruntime.

Load failures are ``EngineError("invalid_model")``; inputs the teacher cannot
take and outputs that are not [B, C] logits are ``"shape_mismatch"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inspect import count_onnx_parameters, count_torchscript_parameters, error_summary, torchscript_load_error
from .registry import EmptyConfig, teacher_formats
from .types import Cancelled, EngineError, TeacherSource


class Teacher:
    """Common interface; subclasses implement ``_forward`` and ``latency_fn``."""

    format = ""

    def __init__(self, path: Path, device: torch.device):
        self.path = Path(path)
        self.device = device

    # -- what subclasses provide -------------------------------------------
    def _forward(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def latency_fn(self, batch: np.ndarray) -> Callable[[], Any]:
        """A zero-argument callable running the teacher once on ``batch`` on CPU."""
        raise NotImplementedError

    @property
    def num_parameters(self) -> int:
        raise NotImplementedError

    def precheck(self, input_name: str, row_shape: tuple[int, ...]) -> None:
        """Raise shape_mismatch early when the declared input cannot take rows of ``row_shape``."""

    def expected_features(self) -> int | None:
        """Flat input width the teacher wants, when it can be told (for messages)."""
        return None

    # -- shared --------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 logits [B, C] on ``self.device`` for a batch [B, *row_shape]."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        rows = x.shape[0]
        out = self._forward(x)
        return _as_logits(out, rows).to(self.device)


def _as_logits(out: Any, rows: int) -> torch.Tensor:
    """Normalise a model output to a float32 [rows, C] tensor, or raise shape_mismatch."""
    if isinstance(out, dict):
        if "logits" not in out:
            raise EngineError(
                "shape_mismatch", f"teacher returned a dict with keys {sorted(out)}; expected a 'logits' entry"
            )
        out = out["logits"]
    if isinstance(out, (tuple, list)):
        # (logits, aux...) outputs: the first element is the logits by convention.
        if not out:
            raise EngineError("shape_mismatch", "teacher returned an empty tuple; expected logits [rows, classes]")
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, torch.Tensor):
        raise EngineError(
            "shape_mismatch", f"teacher returned {type(out).__name__}; expected a logits tensor [rows, classes]"
        )
    if not out.is_floating_point():
        raise EngineError("shape_mismatch", f"teacher output has dtype {out.dtype}; expected float logits")
    if out.dim() != 2:
        raise EngineError(
            "shape_mismatch",
            f"teacher output has shape {list(out.shape)}; expected 2-D logits [rows, classes]",
        )
    if out.shape[0] != rows:
        raise EngineError(
            "shape_mismatch", f"teacher returned {out.shape[0]} output rows for {rows} input rows (shape {list(out.shape)})"
        )
    return out.float()


@teacher_formats.register("torchscript")
class TorchScriptTeacher(Teacher):
    format = "torchscript"
    Config = EmptyConfig

    def __init__(self, path: Path, device: torch.device, threads: int | None = None):
        super().__init__(path, device)
        self.module = _load_torchscript(self.path, device)
        # Feed inputs in the teacher's own float dtype (float64/half teachers exist).
        dtypes = [t.dtype for t in list(self.module.parameters()) + list(self.module.buffers()) if t.is_floating_point()]
        self.input_dtype = dtypes[0] if dtypes else torch.float32
        self._cpu_module: torch.jit.ScriptModule | None = self.module if device.type == "cpu" else None
        self._num_parameters: int | None = None

    def _forward(self, x: np.ndarray) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.input_dtype)
        with torch.inference_mode():
            return self.module(t)

    def latency_fn(self, batch: np.ndarray) -> Callable[[], Any]:
        if self._cpu_module is None:
            self._cpu_module = _load_torchscript(self.path, torch.device("cpu"))
        module = self._cpu_module
        t = torch.from_numpy(np.ascontiguousarray(batch)).to(self.input_dtype)

        def call() -> Any:
            with torch.inference_mode():
                return module(t)

        return call

    @property
    def num_parameters(self) -> int:
        if self._num_parameters is None:
            self._num_parameters = count_torchscript_parameters(self.module)
        return self._num_parameters

    def expected_features(self) -> int | None:
        # Best effort: the first parameterised submodule, if it is a Linear,
        # tells the flat width (weight is [out, in]). Only used in messages.
        try:
            for _, sub in self.module.named_modules():
                params = dict(sub.named_parameters(recurse=False))
                if not params:
                    continue
                if getattr(sub, "original_name", "") == "Linear" and params.get("weight") is not None:
                    return int(params["weight"].shape[1])
                return None
        except Exception:  # introspection only; never fail validation because of it
            return None
        return None


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise EngineError("invalid_model", f"teacher file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError/ValueError/... for junk files
        raise EngineError("invalid_model", f"cannot load teacher: {torchscript_load_error(path, exc)}") from None
    if not hasattr(module, "forward"):
        raise EngineError("invalid_model", "TorchScript teacher has no forward() method")
    return module.eval()


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@teacher_formats.register("onnx")
class OnnxTeacher(Teacher):
    format = "onnx"
    Config = EmptyConfig

    def __init__(self, path: Path, device: torch.device, threads: int | None = None):
        super().__init__(path, device)
        self.threads = threads
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = _ort_session(self.path, providers, threads)
        self._cpu_session = self.session if providers == ["CPUExecutionProvider"] else None
        self.providers = self.session.get_providers()
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise EngineError(
                "unsupported", f"ONNX teacher has {len(inputs)} inputs ({names}); only single-input teachers are supported"
            )
        self.input_name = inputs[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape)
        if inputs[0].type not in _ORT_DTYPES:
            raise EngineError("unsupported", f"ONNX teacher input {self.input_name!r} has type {inputs[0].type}")
        self.input_dtype = _ORT_DTYPES[inputs[0].type]
        # The logits are the first floating-point tensor output (classifier
        # exports often also emit an integer label output).
        outputs = self.session.get_outputs()
        floats = [o.name for o in outputs if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")]
        if not floats:
            kinds = ", ".join(f"{o.name}: {o.type}" for o in outputs)
            raise EngineError("shape_mismatch", f"ONNX teacher has no floating-point output to use as logits ({kinds})")
        self.output_name = floats[0]
        batch = self.input_shape[0] if self.input_shape else None
        # Some exports pin the batch dimension (often to 1); run in chunks of it.
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self._num_parameters: int | None = None

    def _shape_text(self) -> str:
        return "[" + ", ".join("batch" if i == 0 and not isinstance(d, int) else str(d) if d is not None else "?"
                               for i, d in enumerate(self.input_shape)) + "]"

    def expected_features(self) -> int | None:
        dims = self.input_shape[1:]
        if dims and all(isinstance(d, int) for d in dims):
            return int(math.prod(dims))  # type: ignore[arg-type]
        return None

    def precheck(self, input_name: str, row_shape: tuple[int, ...]) -> None:
        want = self.input_shape[1:]
        fits = len(want) == len(row_shape) and all(not isinstance(w, int) or w == r for w, r in zip(want, row_shape))
        if fits:
            return
        where = f"(ONNX input {self.input_name!r} has shape {self._shape_text()})"
        if len(row_shape) == 1 and len(want) == 1:
            msg = f"dataset input {input_name!r} has {row_shape[0]} features per row but the teacher expects {want[0]} {where}"
        else:
            want_text = "[" + ", ".join(str(w) if isinstance(w, int) else "?" for w in want) + "]"
            msg = (
                f"dataset input {input_name!r} has per-row shape {list(row_shape)} "
                f"but the teacher expects per-row shape {want_text} {where}"
            )
        raise EngineError("shape_mismatch", msg)

    def _run(self, session: Any, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return session.run([self.output_name], {self.input_name: x})[0]
        b = self.fixed_batch
        chunks = []
        for start in range(0, x.shape[0], b):
            chunk = x[start : start + b]
            n = chunk.shape[0]
            if n < b:  # pad the tail to the pinned batch size, drop the padding after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            chunks.append(session.run([self.output_name], {self.input_name: chunk})[0][:n])
        return np.concatenate(chunks)

    def _forward(self, x: np.ndarray) -> Any:
        return self._run(self.session, np.ascontiguousarray(x, dtype=self.input_dtype))

    def latency_fn(self, batch: np.ndarray) -> Callable[[], Any]:
        if self._cpu_session is None:
            self._cpu_session = _ort_session(self.path, ["CPUExecutionProvider"], self.threads)
        session = self._cpu_session
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        return lambda: self._run(session, x)

    @property
    def num_parameters(self) -> int:
        # Parsed lazily: validation must stay fast even for large models.
        if self._num_parameters is None:
            import onnx

            self._num_parameters = count_onnx_parameters(onnx.load(str(self.path), load_external_data=False))
        return self._num_parameters


def _ort_session(path: Path, providers: list[str], threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT warns about benign graph details
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not Path(path).is_file():
        raise EngineError("invalid_model", f"teacher file not found: {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise EngineError("invalid_model", f"cannot load teacher as ONNX: {error_summary(exc)}") from None


def load_teacher(source: TeacherSource, device: torch.device, threads: int | None = None) -> Teacher:
    if source.task != "classification":
        raise EngineError("unsupported", f"teacher task {source.task!r} is not supported (only 'classification')")
    if source.format not in teacher_formats:
        raise EngineError(
            "unsupported",
            f"teacher format {source.format!r} is not supported ({', '.join(teacher_formats.names())})",
        )
    cls = teacher_formats.get(source.format)
    return cls(Path(source.path), device, threads)


def probe_teacher(teacher: Teacher, input_name: str, x: np.ndarray) -> int:
    """Run the teacher on the first (up to) 2 rows; return its number of classes.

    Any failure to take the dataset's rows is a shape_mismatch whose message
    names both shapes and quotes the teacher's own error.
    """
    row_shape = tuple(x.shape[1:])
    teacher.precheck(input_name, row_shape)
    probe = x[: min(2, x.shape[0])]
    try:
        logits = teacher(probe)
    except EngineError:
        raise
    except Exception as exc:
        reason = error_summary(exc)
        want = teacher.expected_features()
        have = int(math.prod(row_shape))
        if want is not None and want == have and len(row_shape) > 1:
            msg = (
                f"dataset input {input_name!r} has per-row shape {list(row_shape)} but the teacher expects "
                f"flat rows of {want} features (its first layer is Linear({want}, ...)); "
                f"reshape the array to [rows, {want}]"
            )
        elif want is not None and want != have:
            if len(row_shape) == 1:
                msg = f"dataset input {input_name!r} has {have} features per row but the teacher expects {want}"
            else:
                msg = (
                    f"dataset input {input_name!r} has per-row shape {list(row_shape)} ({have} values) "
                    f"but the teacher expects {want} features"
                )
        else:
            msg = f"dataset input {input_name!r} with per-row shape {list(row_shape)} does not fit the teacher"
        raise EngineError("shape_mismatch", f"{msg}: teacher raised {reason}") from None
    classes = int(logits.shape[1])
    if classes < 2:
        raise EngineError(
            "shape_mismatch",
            f"teacher output has shape {list(logits.shape)}: {classes} value per row, but classification needs >= 2 classes",
        )
    return classes


def teacher_logits(
    teacher: Teacher,
    x: np.ndarray,
    *,
    batch_size: int = 512,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Teacher logits for every row of ``x``, batched: float32 [N, C] on the teacher's device.

    Runs once per job; the result is cached and reused every epoch.
    """
    parts = []
    for start in range(0, x.shape[0], batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("job cancelled while computing teacher outputs")
        try:
            parts.append(teacher(x[start : start + batch_size]))
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(
                "invalid_model", f"teacher failed on rows {start}..{min(start + batch_size, x.shape[0]) - 1}: {error_summary(exc)}"
            ) from None
    logits = torch.cat(parts)
    if not torch.isfinite(logits).all():
        raise EngineError("invalid_model", "teacher produced NaN or infinite logits")
    return logits
