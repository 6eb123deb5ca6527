"""Teachers that are torch modules: TorchScript, torch.export (``.pt2``) and safetensors + architecture.

All three share :class:`TorchTeacher` (positional inputs in ``teacher.inputs`` order, hints by
forward hooks). Also the loaders the students reuse: :func:`load_module` (an uploaded file as a
trainable student) and :func:`load_safetensors_module`. ``.pt2`` archives are only ever opened
through :func:`.pt2_safety.safe_load_exported`.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.inspection.model_facts import count_torchscript_parameters, torchscript_load_error
from engine.inspection.pt2 import safe_load_exported
from engine.registry import teacher_formats
from engine.teachers.base import Batch, Teacher
from engine.errors import EngineError, InvalidModel, InvalidSpec, ShapeMismatch, Unsupported, error_summary
from engine.inspection.zipcheck import refuse_unsafe_zip


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
                    raise InvalidSpec("'penultimate' needs a model with an nn.Linear layer")

                def pre(_m, args, _name=name):
                    got[_name] = args[0]

                handles.append(modules[target].register_forward_pre_hook(pre))
                continue
            if name not in modules or name == "":
                available = [n for n in modules if n]
                raise InvalidSpec(f"no module named {name!r}; available: penultimate, "
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
                raise ShapeMismatch(f"teacher input {name!r} is missing from the batch")
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
                from engine.students import derive  # rebuilds plain Linear/Conv/norm/activation chains as eager modules
            except ImportError:
                derive = None  # type: ignore[assignment]
            rebuilt = None
            if derive is not None and hasattr(derive, "rebuild_chain"):
                try:
                    rebuilt = derive.rebuild_chain(self.module)
                except Exception:
                    rebuilt = None
            if rebuilt is None:
                raise Unsupported("hints on this TorchScript teacher need forward hooks, which TorchScript does not allow on a "
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
                raise InvalidSpec("'penultimate' needs a teacher with a Linear layer")
        elif name not in known:
            raise InvalidSpec(f"teacher has no module named {name!r}; available: penultimate, "
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
        raise InvalidModel(f"teacher file not found: {path}")
    if zipfile.is_zipfile(path):  # torch's reader and zipfile must see the same members
        refuse_unsafe_zip(path, "invalid_model", "TorchScript archive")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError/ValueError/... for junk files
        raise InvalidModel(f"cannot load teacher: {torchscript_load_error(path, exc)}") from None
    if not hasattr(module, "forward"):
        raise InvalidModel("TorchScript teacher has no forward() method")
    return module.eval()


# ---------------------------------------------------------------------------------------------
# torch.export (.pt2), opened by pt2_safety.safe_load_exported


@teacher_formats.register("torch_export")
class TorchExportTeacher(TorchTeacher):
    format = "torch_export"

    def __init__(self, path: Path, device: torch.device, threads: int | None = None, *,
                 task: str = "classification", architecture: dict | None = None):
        super().__init__(path, device, task)
        self.program = safe_load_exported(self.path)
        try:
            self.module = self.program.module().to(device)
        except Exception as exc:
            raise InvalidModel(f"cannot build the exported program: {error_summary(exc)}") from None
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
                    raise InvalidSpec("'penultimate' needs a teacher with a linear layer")
                node = lin[-1]
                wanted[name] = node.args[1] if str(node.target) == "aten.addmm.default" else node.args[0]
            elif name in nodes:
                wanted[name] = nodes[name]
            else:
                raise InvalidSpec(f"teacher has no module named {name!r}; available: penultimate, "
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
        raise InvalidModel(f"a safetensors {what} needs an 'architecture' "
                          "(e.g. {\"family\": \"mlp\", \"in_features\": 64, \"hidden\": [256], \"out_features\": 10})")
    if not Path(path).is_file():
        raise InvalidModel(f"model file not found: {path}")
    from engine.students.architecture import from_architecture

    try:
        module = from_architecture(dict(architecture))
    except EngineError as exc:
        raise InvalidModel(f"cannot build the {what} architecture: {exc.message}") from None
    except Exception as exc:
        raise InvalidModel(f"cannot build the {what} architecture: {error_summary(exc)}") from None
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise InvalidModel(f"cannot read safetensors file: {error_summary(exc)}") from None
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise InvalidModel(f"safetensors weights do not match the architecture: missing keys {missing[:20]}, "
            f"unexpected keys {unexpected[:20]}",
        )
    wrong = [f"{k} {list(state[k].shape)} (architecture: {list(own[k].shape)})" for k in own
             if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise InvalidModel("safetensors weights do not match the architecture: shape mismatch for "
                          + ", ".join(wrong[:10]))
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise InvalidModel(f"safetensors weights do not match the architecture: "
                          f"{error_summary(exc)}") from None
    return module


@teacher_formats.register("safetensors")
class SafetensorsTeacher(TorchTeacher):
    format = "safetensors"

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
            raise InvalidModel(f"cannot build the exported program: {error_summary(exc)}") from None
    elif format == "safetensors":
        module = load_safetensors_module(path, architecture, what="student")
    else:
        raise Unsupported(f"a student model must be torchscript, torch_export or safetensors, "
                          f"got {format!r}")
    for p in module.parameters():
        p.requires_grad_(True)
    return module

