"""Teacher models behind one interface (registry ``teacher_formats``).

``load_teacher(source, device)`` returns a :class:`Teacher`. Formats:

* ``torchscript``: ``torch.jit.load``
* ``onnx``: onnxruntime session (several named inputs matched to dataset arrays by name)
* ``torch_export``: a ``.pt2`` from ``torch.export.save``, loaded by :func:`safe_load_exported`,
  which refuses every archive feature that would unpickle or run code (see there)
* ``safetensors``: weights + ``TeacherSource.architecture`` (a built-in family dict),
  built with ``students.from_architecture`` then ``load_state_dict(strict=True)``

Interface: ``teacher.bind(inputs)`` fixes the dataset input order; then
``teacher({name: tensor}) -> float32 [B, D]`` (inputs in ``inputs`` order for
torch teachers, by name for ONNX), ``teacher.features(batch, names)`` for hints,
``teacher.module`` (torch module or None for ONNX) for data-free synthesis.
Load failures are ``EngineError("invalid_model")``; inputs the teacher cannot
take and outputs that are not [B, D] are ``"shape_mismatch"``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .inspect import count_onnx_parameters, count_torchscript_parameters, error_summary, torchscript_load_error
from .registry import EmptyConfig, teacher_formats
from .types import TASKS, Cancelled, EngineError, TeacherSource

Batch = Mapping[str, torch.Tensor]


class Teacher:
    """Common interface; subclasses implement ``_forward``, ``_features`` and ``latency_fn``."""

    format = ""
    module: nn.Module | None = None
    architecture: dict[str, Any] | None = None

    def __init__(self, path: Path, device: torch.device, task: str = "classification"):
        self.path = Path(path)
        self.device = device
        self.task = task
        self.inputs: list[str] = ["x"]

    def bind(self, inputs: Sequence[str]) -> None:
        """Fix the dataset's input names (positional order for torch teachers)."""
        self.inputs = list(inputs)

    # -- what subclasses provide -------------------------------------------
    def _forward(self, batch: Batch) -> Any:
        raise NotImplementedError

    def _features(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise EngineError("unsupported", f"{self.format} teachers do not support hints")

    def feature_names(self) -> list[str]:
        return []

    def latency_fn(self, batch: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        raise NotImplementedError

    @property
    def num_parameters(self) -> int:
        raise NotImplementedError

    def precheck(self, row_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise shape_mismatch early when declared inputs cannot take the dataset's rows."""

    def expected_features(self) -> int | None:
        return None

    # -- shared --------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def _batch(self, x: Any) -> dict[str, torch.Tensor]:
        if isinstance(x, Mapping):
            return {k: torch.as_tensor(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return {n: torch.as_tensor(v) for n, v in zip(self.inputs, x)}
        return {self.inputs[0]: torch.as_tensor(x)}

    def __call__(self, x: Any) -> torch.Tensor:
        """float32 outputs [B, D] on ``self.device`` for a batch ({name: [B, ...]}, or one array)."""
        batch = self._batch(x)
        rows = int(next(iter(batch.values())).shape[0])
        out = self._forward(batch)
        return as_outputs(out, rows, self.task).to(self.device)

    def features(self, x: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Intermediate features {name: float32 [B, ...]} (``"penultimate"``: input of the last linear layer)."""
        batch = self._batch(x)
        feats = self._features(batch, list(names))
        return {k: v.detach().float().to(self.device) for k, v in feats.items()}


def as_outputs(out: Any, rows: int, task: str = "classification") -> torch.Tensor:
    """Normalise a model output to a float32 [rows, D] tensor, or raise shape_mismatch."""
    if isinstance(out, Mapping):
        for key in ("logits", "embeddings", "embedding", "predictions", "output", "outputs", "pooler_output"):
            if key in out:
                out = out[key]
                break
        else:
            raise EngineError(
                "shape_mismatch", f"teacher returned a dict with keys {sorted(out)}; expected a 'logits' entry"
            )
    if isinstance(out, (tuple, list)):
        # (logits, aux...) outputs: the first element is the output by convention.
        if not out:
            raise EngineError("shape_mismatch", "teacher returned an empty tuple; expected outputs [rows, D]")
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, torch.Tensor):
        raise EngineError("shape_mismatch", f"teacher returned {type(out).__name__}; expected a tensor [rows, D]")
    if not out.is_floating_point():
        raise EngineError("shape_mismatch", f"teacher output has dtype {out.dtype}; expected float outputs")
    if out.dim() == 1 and task == "regression" and out.shape[0] == rows:
        out = out.unsqueeze(1)
    if out.dim() != 2:
        what = "logits [rows, classes]" if task == "classification" else "outputs [rows, D]"
        raise EngineError("shape_mismatch", f"teacher output has shape {list(out.shape)}; expected 2-D {what}")
    if out.shape[0] != rows:
        raise EngineError(
            "shape_mismatch", f"teacher returned {out.shape[0]} output rows for {rows} input rows (shape {list(out.shape)})"
        )
    return out.float()


# ---------------------------------------------------------------------------------------------
# torch-based teachers


def last_linear_name(module: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` in ``named_modules`` order (its input is "penultimate")."""
    name = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def capture_features(module: nn.Module, names: Sequence[str], run: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """Run ``run()`` with forward hooks on ``module``'s submodules ``names``; their outputs (inputs for penultimate).

    Works for any eager module; names must be in ``dict(module.named_modules())``. The
    captured tensors keep their autograd graph (students need gradients through them).
    """
    modules = dict(module.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            if name == "penultimate":
                target = last_linear_name(module)
                if target is None:
                    raise EngineError("invalid_spec", "'penultimate' needs a model with an nn.Linear layer")

                def pre(_m, args, _name=name):
                    got[_name] = args[0]

                handles.append(modules[target].register_forward_pre_hook(pre))
                continue
            if name not in modules or name == "":
                available = [n for n in modules if n]
                raise EngineError("invalid_spec", f"no module named {name!r}; available: penultimate, "
                                  + ", ".join(available[:60]))

            def hook(_m, _args, output, _name=name):
                got[_name] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(modules[name].register_forward_hook(hook))
        run()
    finally:
        for h in handles:
            h.remove()
    return got


class TorchTeacher(Teacher):
    """A teacher that is a torch module; ``module`` runs the forward pass."""

    def _post_init(self) -> None:
        dtypes = [t.dtype for t in list(self.module.parameters()) + list(self.module.buffers())
                  if t.is_floating_point()]
        self.input_dtype = dtypes[0] if dtypes else torch.float32
        self._num_parameters: int | None = None

    def _args(self, batch: Batch, device: torch.device | None = None) -> list[torch.Tensor]:
        device = device or self.device
        args = []
        for name in self.inputs:
            if name not in batch:
                raise EngineError("shape_mismatch", f"teacher input {name!r} is missing from the batch")
            t = batch[name]
            t = t.to(device, self.input_dtype) if t.is_floating_point() else t.to(device, torch.int64)
            args.append(t)
        return args

    def _forward(self, batch: Batch) -> Any:
        with torch.inference_mode():
            return self.module(*self._args(batch))

    def latency_fn(self, batch: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        module = self._cpu_module()
        args = self._args({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()},
                          torch.device("cpu"))

        def call() -> Any:
            with torch.inference_mode():
                return module(*args)

        return call

    def _cpu_module(self) -> nn.Module:
        if self.device.type == "cpu":
            return self.module
        import copy

        return copy.deepcopy(self.module).cpu()

    @property
    def num_parameters(self) -> int:
        if self._num_parameters is None:
            self._num_parameters = count_torchscript_parameters(self.module)
        return self._num_parameters

    def feature_names(self) -> list[str]:
        return ["penultimate"] + [n for n, _ in self.module.named_modules() if n]

    def _features(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        args = self._args(batch)
        with torch.inference_mode():
            return capture_features(self.module, names, lambda: self.module(*args))

    def expected_features(self) -> int | None:
        try:
            for _, sub in self.module.named_modules():
                params = dict(sub.named_parameters(recurse=False))
                if not params:
                    continue
                w = params.get("weight")
                is_linear = isinstance(sub, nn.Linear) or getattr(sub, "original_name", "") == "Linear"
                if is_linear and w is not None:
                    return int(w.shape[1])
                return None
        except Exception:
            return None
        return None


@teacher_formats.register("torchscript")
class TorchScriptTeacher(TorchTeacher):
    format = "torchscript"
    Config = EmptyConfig

    def __init__(self, path: Path, device: torch.device, threads: int | None = None, *,
                 task: str = "classification", architecture: dict | None = None):
        super().__init__(path, device, task)
        self.module = _load_torchscript(self.path, device)
        self._post_init()
        self._eager: nn.Module | None = None

    def _features(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        args = self._args(batch)
        with torch.inference_mode():
            chain = _script_chain(self.module)
            if chain is not None and len(args) == 1:
                return _run_chain(chain, args[0], names)
            eager = self._eager_copy()
            return capture_features(eager, names, lambda: eager(*args))

    def feature_names(self) -> list[str]:
        chain = _script_chain(self.module)
        if chain is not None:
            return ["penultimate"] + [n for n, _, _ in chain]
        return ["penultimate"] + [n for n, _ in self.module.named_modules() if n]

    def _eager_copy(self) -> nn.Module:
        if self._eager is None:
            try:
                from . import derive  # rebuilds plain Linear/Conv/norm/activation chains as eager modules
            except ImportError:
                derive = None  # type: ignore[assignment]
            rebuilt = None
            if derive is not None and hasattr(derive, "rebuild_chain"):
                try:
                    rebuilt = derive.rebuild_chain(self.module)
                except Exception:
                    rebuilt = None
            if rebuilt is None:
                raise EngineError(
                    "unsupported",
                    "hints on this TorchScript teacher need forward hooks, which TorchScript does not allow on a "
                    "loaded module, and it is not a plain Sequential chain that could be rebuilt; "
                    "upload it as torch_export or ONNX to use hints",
                )
            self._eager = rebuilt.to(self.device).eval()
        return self._eager


def _script_chain(module: Any, prefix: str = "") -> list[tuple[str, Any, str]] | None:
    """Flatten a (nested) scripted ``nn.Sequential`` into [(name, submodule, original_name)], else None."""
    if getattr(module, "original_name", type(module).__name__) != "Sequential":
        return None
    out: list[tuple[str, Any, str]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        sub = _script_chain(child, full + ".")
        if sub is not None:
            out += sub
        else:
            out.append((full, child, getattr(child, "original_name", type(child).__name__)))
    return out


def _run_chain(chain: list[tuple[str, Any, str]], x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    last_linear = max((i for i, (_, _, kind) in enumerate(chain) if kind == "Linear"), default=None)
    known = {n for n, _, _ in chain}
    for name in names:
        if name == "penultimate":
            if last_linear is None:
                raise EngineError("invalid_spec", "'penultimate' needs a teacher with a Linear layer")
        elif name not in known:
            raise EngineError("invalid_spec", f"teacher has no module named {name!r}; available: penultimate, "
                              + ", ".join(n for n, _, _ in chain))
    got = {}
    for i, (name, child, _) in enumerate(chain):
        if i == last_linear and "penultimate" in names:
            got["penultimate"] = x
        x = child(x)
        if name in names:
            got[name] = x
    return got


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


# ---------------------------------------------------------------------------------------------
# torch.export (.pt2), loaded safely

# torch.export.load() unpickles in several places (weights/constants flagged use_pickle are read with
# torch.load(weights_only=False), custom/opaque objects with pickle, sample inputs fall back to
# weights_only=False), loads AOTInductor native code when present, evaluates shape expressions with
# sympy.sympify (eval) and resolves node targets by getattr on the torch module (torch.os.system...).
# safe_load_exported() checks the archive first and refuses all of that, so torch.export.load only
# ever takes its plain-tensor path.

_SAFE_EXPR_NAMES = {
    "Symbol", "Integer", "Rational", "True", "False", "positive", "integer", "nonnegative", "real", "finite",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "IntTrueDiv", "FloatTrueDiv", "Max", "Min", "oo", "TruncToInt",
}
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<str>'[A-Za-z_][A-Za-z0-9_]*')"
                         r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>\*\*|//|[-+*/%(),=<>!]=?))")
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}\d+$")
_SAFE_OPERATOR = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le",
                  "gt", "ge", "and_", "or_", "not_", "pos", "abs", "sym_not", "sym_float", "sym_int", "sym_max",
                  "sym_min", "sym_sqrt", "sym_ite"}


def _safe_expr(text: str) -> bool:
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return text[pos:].strip() == ""
        name = m.group("name")
        if name is not None and name not in _SAFE_EXPR_NAMES and not _SYMBOL_NAME.match(name):
            return False
        s = m.group("str")
        if s is not None and not _SYMBOL_NAME.match(s[1:-1]):
            return False
        pos = m.end()
    return True


def _safe_target(target: str) -> bool:
    import operator

    if target.startswith("torch.ops."):
        parts = target.split(".")[2:]
        if not 2 <= len(parts) <= 3 or any(p.startswith("__") or not p for p in parts):
            return False
        obj: Any = torch.ops
        try:
            for p in parts:
                obj = getattr(obj, p)
        except Exception:
            return False
        return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))
    if target.startswith("_operator."):
        name = target[len("_operator."):]
        return name in _SAFE_OPERATOR and hasattr(operator, name)
    if target.startswith("math."):
        import math as _m

        name = target[len("math."):]
        return name.isidentifier() and not name.startswith("_") and callable(getattr(_m, name, None))
    if target.startswith("torch.sym_") or target in ("torch.sym_float", "torch.sym_int"):
        return target.count(".") == 1 and callable(getattr(torch, target.split(".")[1], None))
    return False


def check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle, run native code, or eval anything; else return."""

    def bad(reason: str) -> EngineError:
        return EngineError("invalid_model", f"refusing torch.export archive: {reason}")

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise EngineError("invalid_model", "not a torch.export archive: the file is not a zip archive "
                          "(save it with torch.export.save(exported_program, 'model.pt2'))") from None
    with zf:
        names = zf.namelist()
        if not names:
            raise bad("the archive is empty")
        root = names[0].split("/")[0]
        rel = {n[len(root) + 1:]: n for n in names if n.startswith(root + "/")}
        if "archive_format" not in rel:
            raise bad("it is not in the current torch.export.save format (re-save it with torch >= 2.7)")
        if any(r.startswith("data/aotinductor/") for r in rel):
            raise bad("it contains AOTInductor-compiled native code")
        models = [r for r in rel if r.startswith("models/") and r.endswith(".json")]
        if not models:
            raise bad("it holds no exported program")
        for r, full in rel.items():
            if r.startswith("data/weights/") and r.endswith(".pt") or r.startswith("data/constants/") and r.endswith(".pt"):
                raise bad(f"{r} is a pickled legacy payload")
            if r.endswith("_config.json") and (r.startswith("data/weights/") or r.startswith("data/constants/")):
                config = json.loads(zf.read(full)).get("config", {})
                for key, meta in config.items():
                    if meta.get("use_pickle"):
                        raise bad(f"{key!r} is stored pickled (tensor subclasses are not accepted)")
                    p = str(meta.get("path_name", ""))
                    if r.startswith("data/constants/") and not p.startswith("tensor_"):
                        raise bad(f"constant {key!r} is a custom/opaque object (needs pickle)")
        for r in models:
            program = json.loads(zf.read(rel[r]))
            for key, value in _walk_strings(program):
                if key == "expr_str" and not _safe_expr(value):
                    raise bad(f"shape expression {value[:80]!r} is not a plain symbolic expression")
                if key == "target" and not _safe_target(value):
                    raise bad(f"graph calls {value[:80]!r}, which is not a torch operator")
            name = r[len("models/"):-len(".json")]
            sample = rel.get(f"data/sample_inputs/{name}.pt")
            if sample is not None:
                import io

                data = zf.read(sample)
                if data:
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception:
                        raise bad("its sample inputs cannot be read without unpickling objects") from None


def _walk_strings(obj: Any, key: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_strings(v, key)
    elif isinstance(obj, str) and key in ("expr_str", "target"):
        yield key, obj


def safe_load_exported(path: Path) -> Any:
    """``torch.export.load`` after :func:`check_pt2_archive` (raises invalid_model)."""
    if not Path(path).is_file():
        raise EngineError("invalid_model", f"model file not found: {path}")
    check_pt2_archive(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError("invalid_model", f"cannot load torch.export archive: {error_summary(exc)}") from None


@teacher_formats.register("torch_export")
class TorchExportTeacher(TorchTeacher):
    format = "torch_export"
    Config = EmptyConfig

    def __init__(self, path: Path, device: torch.device, threads: int | None = None, *,
                 task: str = "classification", architecture: dict | None = None):
        super().__init__(path, device, task)
        self.program = safe_load_exported(self.path)
        try:
            self.module = self.program.module().to(device)
        except Exception as exc:
            raise EngineError("invalid_model", f"cannot build the exported program: {error_summary(exc)}") from None
        self._post_init()

    @property
    def num_parameters(self) -> int:
        if self._num_parameters is None:
            self._num_parameters = int(sum(t.numel() for t in self.program.state_dict.values()))
        return self._num_parameters

    def _module_nodes(self) -> dict[str, Any]:
        """module path -> the last graph node computed inside it."""
        last: dict[str, Any] = {}
        for node in self.module.graph.nodes:
            if node.op != "call_function":
                continue
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                if path:
                    last[path] = node
        return last

    def feature_names(self) -> list[str]:
        return ["penultimate"] + sorted(self._module_nodes())

    def _features(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        nodes = self._module_nodes()
        wanted = {}
        for name in names:
            if name == "penultimate":
                lin = [n for n in self.module.graph.nodes if n.op == "call_function"
                       and str(n.target) in ("aten.linear.default", "aten.addmm.default", "aten.mm.default")]
                if not lin:
                    raise EngineError("invalid_spec", "'penultimate' needs a teacher with a linear layer")
                node = lin[-1]
                wanted[name] = node.args[1] if str(node.target) == "aten.addmm.default" else node.args[0]
            elif name in nodes:
                wanted[name] = nodes[name]
            else:
                raise EngineError("invalid_spec", f"teacher has no module named {name!r}; available: penultimate, "
                                  + ", ".join(sorted(nodes)))
        interp = torch.fx.Interpreter(self.module, garbage_collect_values=False)
        with torch.inference_mode():
            interp.run(*self._args(batch))
        return {k: interp.env[n] for k, n in wanted.items()}


# ---------------------------------------------------------------------------------------------
# safetensors + architecture


def load_safetensors_module(path: Path, architecture: dict | None, *, what: str = "teacher") -> nn.Module:
    from safetensors.torch import load_file

    if architecture is None:
        raise EngineError("invalid_model", f"a safetensors {what} needs an 'architecture' "
                          "(e.g. {\"family\": \"mlp\", \"in_features\": 64, \"hidden\": [256], \"out_features\": 10})")
    if not Path(path).is_file():
        raise EngineError("invalid_model", f"model file not found: {path}")
    from . import students

    try:
        module = students.from_architecture(dict(architecture))
    except EngineError as exc:
        raise EngineError("invalid_model", f"cannot build the {what} architecture: {exc.message}") from None
    except Exception as exc:
        raise EngineError("invalid_model", f"cannot build the {what} architecture: {error_summary(exc)}") from None
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise EngineError("invalid_model", f"cannot read safetensors file: {error_summary(exc)}") from None
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise EngineError(
            "invalid_model",
            f"safetensors weights do not match the architecture: missing keys {missing[:20]}, "
            f"unexpected keys {unexpected[:20]}",
        )
    wrong = [f"{k} {list(state[k].shape)} (architecture: {list(own[k].shape)})" for k in own
             if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise EngineError("invalid_model", "safetensors weights do not match the architecture: shape mismatch for "
                          + ", ".join(wrong[:10]))
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise EngineError("invalid_model", f"safetensors weights do not match the architecture: "
                          f"{error_summary(exc)}") from None
    return module


@teacher_formats.register("safetensors")
class SafetensorsTeacher(TorchTeacher):
    format = "safetensors"
    Config = EmptyConfig

    def __init__(self, path: Path, device: torch.device, threads: int | None = None, *,
                 task: str = "classification", architecture: dict | None = None):
        super().__init__(path, device, task)
        self.architecture = dict(architecture) if architecture else None
        self.module = load_safetensors_module(self.path, architecture).to(device).eval()
        self._post_init()


def load_module(path: Path, format: str, architecture: dict | None = None) -> nn.Module:
    """A trainable module from an uploaded file (for ``student: {"model_id"}``)."""
    path = Path(path)
    if format == "torchscript":
        module = _load_torchscript(path, torch.device("cpu")).train()
    elif format == "torch_export":
        try:
            module = safe_load_exported(path).module()
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError("invalid_model", f"cannot build the exported program: {error_summary(exc)}") from None
    elif format == "safetensors":
        module = load_safetensors_module(path, architecture, what="student")
    else:
        raise EngineError("unsupported", f"a student model must be torchscript, torch_export or safetensors, "
                          f"got {format!r}")
    for p in module.parameters():
        p.requires_grad_(True)
    return module


# ---------------------------------------------------------------------------------------------
# ONNX

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
    Config = EmptyConfig

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
        self.session = _ort_session(self.path, providers, threads)
        self._cpu_session = self.session if providers == ["CPUExecutionProvider"] else None
        self.session_inputs = self.session.get_inputs()
        for i in self.session_inputs:
            if i.type not in _ORT_DTYPES:
                raise EngineError("unsupported", f"ONNX teacher input {i.name!r} has type {i.type}")
        outputs = self.session.get_outputs()
        floats = [o.name for o in outputs if o.type in _FLOAT_TYPES]
        if not floats:
            kinds = ", ".join(f"{o.name}: {o.type}" for o in outputs)
            raise EngineError("shape_mismatch", f"ONNX teacher has no floating-point output ({kinds})")
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
            raise EngineError(
                "shape_mismatch",
                f"ONNX teacher inputs {names} are matched to dataset arrays by name, but the dataset has no "
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
            raise EngineError("shape_mismatch", msg)

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
                        raise EngineError("invalid_spec", "'penultimate' needs an ONNX teacher with a Gemm/MatMul node")
                    tensors.append(lin[-1].input[0])
                elif name in produced or name in {i.name for i in model.graph.input}:
                    tensors.append(name)
                else:
                    raise EngineError("invalid_spec", f"ONNX teacher has no tensor named {name!r}; available: "
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
    task = getattr(source, "task", "classification")
    if task not in TASKS:
        raise EngineError("unsupported", f"teacher task {task!r} is not supported ({', '.join(TASKS)})")
    if source.format not in teacher_formats:
        raise EngineError(
            "unsupported",
            f"teacher format {source.format!r} is not supported ({', '.join(teacher_formats.names())})",
        )
    cls = teacher_formats.get(source.format)
    return cls(Path(source.path), device, threads, task=task, architecture=getattr(source, "architecture", None))


def probe_teacher(teacher: Teacher, x: Mapping[str, np.ndarray]) -> int:
    """Bind the dataset's inputs, run the teacher on the first (up to) 2 rows; return its output width.

    Any failure to take the dataset's rows is a shape_mismatch whose message
    names both shapes and quotes the teacher's own error.
    """
    names = list(x)
    teacher.bind(names)
    row_shapes = {k: tuple(v.shape[1:]) for k, v in x.items()}
    teacher.precheck(row_shapes)
    probe = {k: torch.from_numpy(np.array(_as_model_input(v[: min(2, v.shape[0])]), copy=True)) for k, v in x.items()}
    try:
        out = teacher(probe)
    except EngineError:
        raise
    except Exception as exc:
        reason = error_summary(exc)
        first = names[0]
        row_shape = row_shapes[first]
        want = teacher.expected_features()
        have = int(math.prod(row_shape))
        if len(names) > 1:
            shapes = ", ".join(f"{k} {list(v)}" for k, v in row_shapes.items())
            msg = f"dataset inputs ({shapes}) do not fit the teacher"
        elif want is not None and want == have and len(row_shape) > 1:
            msg = (
                f"dataset input {first!r} has per-row shape {list(row_shape)} but the teacher expects "
                f"flat rows of {want} features (its first layer is Linear({want}, ...)); "
                f"reshape the array to [rows, {want}]"
            )
        elif want is not None and want != have:
            if len(row_shape) == 1:
                msg = f"dataset input {first!r} has {have} features per row but the teacher expects {want}"
            else:
                msg = (
                    f"dataset input {first!r} has per-row shape {list(row_shape)} ({have} values) "
                    f"but the teacher expects {want} features"
                )
        else:
            msg = f"dataset input {first!r} with per-row shape {list(row_shape)} does not fit the teacher"
        raise EngineError("shape_mismatch", f"{msg}: teacher raised {reason}") from None
    width = int(out.shape[1])
    if teacher.task == "classification" and width < 2:
        raise EngineError(
            "shape_mismatch",
            f"teacher output has shape {list(out.shape)}: {width} value per row, but classification needs >= 2 classes",
        )
    return width


def _as_model_input(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    return a.astype(np.float32, copy=False)


def teacher_outputs(
    teacher: Teacher,
    x: Mapping[str, Any],
    *,
    batch_size: int = 512,
    should_stop: Callable[[], bool] | None = None,
    features: Sequence[str] = (),
    on_batch: Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Teacher outputs (and hint features) for every row, batched.

    Returns ``(outputs [N, D], {feature: [N, ...]})`` on the teacher's device, or, when
    ``on_batch(start, out, feats)`` is given, streams batches to it and returns None.
    """
    n = int(next(iter(x.values())).shape[0])
    parts: list[torch.Tensor] = []
    fparts: dict[str, list[torch.Tensor]] = {f: [] for f in features}
    for start in range(0, n, batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("job cancelled while computing teacher outputs")
        batch = {k: torch.from_numpy(np.ascontiguousarray(_as_model_input(v[start:start + batch_size])))
                 for k, v in x.items()}
        try:
            out = teacher(batch)
            feats = teacher.features(batch, list(features)) if features else {}
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(
                "invalid_model", f"teacher failed on rows {start}..{min(start + batch_size, n) - 1}: {error_summary(exc)}"
            ) from None
        if not torch.isfinite(out).all():
            raise EngineError("invalid_model", "teacher produced NaN or infinite outputs")
        if on_batch is not None:
            on_batch(start, out, feats)
        else:
            parts.append(out)
            for k, v in feats.items():
                fparts[k].append(v)
    if on_batch is not None:
        return None
    return torch.cat(parts), {k: torch.cat(v) for k, v in fparts.items()}


def teacher_logits(teacher: Teacher, x: Any, *, batch_size: int = 512,
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Backwards-compatible helper: outputs for one input array (or a dict of arrays)."""
    if not isinstance(x, Mapping):
        x = {teacher.inputs[0]: x}
    result = teacher_outputs(teacher, x, batch_size=batch_size, should_stop=should_stop)
    assert result is not None
    return result[0]
