"""The ONNX teacher: an onnxruntime session whose inputs are matched to dataset arrays by name.

Runs on CUDA when onnxruntime has the CUDA provider and the job's device is CUDA, else on CPU;
a pinned batch dimension is run in chunks of it; hints add the requested tensors as extra graph
outputs of a second session.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.inspection.model_facts import count_onnx_parameters, external_data_error
from engine.registry import teacher_formats
from engine.teachers.base import Batch, Teacher
from engine.errors import InvalidModel, InvalidSpec, ShapeMismatch, Unsupported, error_summary

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
_FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")


@teacher_formats.register("onnx")
class OnnxTeacher(Teacher):
    format = "onnx"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None, *,
                 task: str = "classification", architecture: dict | None = None):
        super().__init__(path, device, task)
        self.threads = threads
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers_wanted = providers
        refuse_external_data(self.path)
        self.session = _ort_session(self.path, providers, threads)
        self._cpu_session = self.session if providers == ["CPUExecutionProvider"] else None
        self.session_inputs = self.session.get_inputs()
        for i in self.session_inputs:
            if i.type not in _ORT_DTYPES:
                raise Unsupported(f"ONNX teacher input {i.name!r} has type {i.type}")
        outputs = self.session.get_outputs()
        floats = [o.name for o in outputs if o.type in _FLOAT_TYPES]
        if not floats:
            kinds = ", ".join(f"{o.name}: {o.type}" for o in outputs)
            raise ShapeMismatch(f"ONNX teacher has no floating-point output ({kinds})")
        self.output_name = floats[0]
        batch = self.session_inputs[0].shape[0] if self.session_inputs[0].shape else None
        # Some exports pin the batch dimension (often to 1); run in chunks of it.
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self._num_parameters: int | None = None
        self._feature_sessions: dict[tuple[str, ...], tuple[Any, list[str]]] = {}
        self.mapping: dict[str, str] = {}

    def bind(self, inputs: Sequence[str]) -> None:
        super().bind(inputs)
        names = [i.name for i in self.session_inputs]
        if len(names) == 1 and len(inputs) == 1:
            self.mapping = {names[0]: inputs[0]}
            return
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ShapeMismatch(f"ONNX teacher inputs {names} are matched to dataset arrays by name, but the dataset has no "
                f"{', '.join(map(repr, missing))} (dataset inputs: {list(inputs)})",
            )
        self.mapping = {n: n for n in names}

    @property
    def input_shape(self) -> list[Any]:
        return list(self.session_inputs[0].shape)

    def expected_features(self) -> int | None:
        dims = self.input_shape[1:]
        if len(self.session_inputs) == 1 and dims and all(isinstance(d, int) for d in dims):
            return int(math.prod(dims))
        return None

    def precheck(self, row_shapes: Mapping[str, tuple[int, ...]]) -> None:
        for inp in self.session_inputs:
            data_name = self.mapping.get(inp.name, inp.name)
            if data_name not in row_shapes:
                continue
            row_shape = row_shapes[data_name]
            want = list(inp.shape)[1:]
            fits = len(want) == len(row_shape) and all(not isinstance(w, int) or w == r for w, r in zip(want, row_shape))
            if fits:
                continue
            shape_text = "[" + ", ".join("batch" if i == 0 and not isinstance(d, int) else str(d) if d is not None
                                         else "?" for i, d in enumerate(inp.shape)) + "]"
            where = f"(ONNX input {inp.name!r} has shape {shape_text})"
            if len(row_shape) == 1 and len(want) == 1:
                msg = (f"dataset input {data_name!r} has {row_shape[0]} features per row but the teacher expects "
                       f"{want[0]} {where}")
            else:
                want_text = "[" + ", ".join(str(w) if isinstance(w, int) else "?" for w in want) + "]"
                msg = (f"dataset input {data_name!r} has per-row shape {list(row_shape)} "
                       f"but the teacher expects per-row shape {want_text} {where}")
            raise ShapeMismatch(msg)

    def _feeds(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feeds = {}
        for inp in self.session_inputs:
            v = batch[self.mapping.get(inp.name, inp.name)]
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            feeds[inp.name] = np.ascontiguousarray(v, dtype=_ORT_DTYPES[inp.type])
        return feeds

    def _run(self, session: Any, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = next(iter(feeds.values())).shape[0]
        if self.fixed_batch is None or rows == self.fixed_batch:
            return session.run(outputs, feeds)
        b = self.fixed_batch
        parts: list[list[np.ndarray]] = []
        for start in range(0, rows, b):
            chunk = {k: v[start:start + b] for k, v in feeds.items()}
            n = next(iter(chunk.values())).shape[0]
            if n < b:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], b - n, axis=0)]) for k, v in chunk.items()}
            parts.append([o[:n] for o in session.run(outputs, chunk)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(outputs))]

    def _forward(self, batch: Batch) -> Any:
        return self._run(self.session, [self.output_name], self._feeds(batch))[0]

    def latency_fn(self, batch: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        if self._cpu_session is None:
            self._cpu_session = _ort_session(self.path, ["CPUExecutionProvider"], self.threads)
        session = self._cpu_session
        feeds = self._feeds(batch)
        return lambda: self._run(session, [self.output_name], feeds)

    @property
    def num_parameters(self) -> int:
        if self._num_parameters is None:
            import onnx

            self._num_parameters = count_onnx_parameters(onnx.load(str(self.path), load_external_data=False))
        return self._num_parameters

    def _graph(self) -> Any:
        import onnx

        return onnx.load(str(self.path), load_external_data=False)

    def feature_names(self) -> list[str]:
        model = self._graph()
        return ["penultimate"] + [o for n in model.graph.node for o in n.output]

    def _features(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        key = tuple(names)
        if key not in self._feature_sessions:
            import onnx

            model = self._graph()
            produced = [o for n in model.graph.node for o in n.output]
            tensors = []
            for name in names:
                if name == "penultimate":
                    lin = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
                    if not lin:
                        raise InvalidSpec("'penultimate' needs an ONNX teacher with a Gemm/MatMul node")
                    tensors.append(lin[-1].input[0])
                elif name in produced or name in {i.name for i in model.graph.input}:
                    tensors.append(name)
                else:
                    raise InvalidSpec(f"ONNX teacher has no tensor named {name!r}; available: "
                                      "penultimate, " + ", ".join(produced[:60]))
            existing = {o.name for o in model.graph.output}
            for t in tensors:
                if t not in existing:
                    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
                    existing.add(t)
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                           providers=self.providers_wanted)
            self._feature_sessions[key] = (session, tensors)
        session, tensors = self._feature_sessions[key]
        outs = self._run(session, tensors, self._feeds(batch))
        return {name: torch.from_numpy(np.ascontiguousarray(o)) for name, o in zip(names, outs)}


def refuse_external_data(path: Path) -> None:
    """Raise ``EngineError("invalid_model")`` when the ONNX model at ``path`` keeps tensors in external
    files: onnxruntime would open whatever path the model names. Only the protobuf is parsed."""
    import onnx

    if not Path(path).is_file():
        raise InvalidModel(f"teacher file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModel(f"cannot load teacher as ONNX: {error_summary(exc)}") from None
    if (refused := external_data_error(model)) is not None:
        raise InvalidModel(refused)


def _ort_session(path: Path, providers: list[str], threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT warns about benign graph details
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not Path(path).is_file():
        raise InvalidModel(f"teacher file not found: {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise InvalidModel(f"cannot load teacher as ONNX: {error_summary(exc)}") from None
