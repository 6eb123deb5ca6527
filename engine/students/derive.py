"""Derived students: shrink the teacher's own architecture (``student: {"derive": {...}, "init": ...}``).

``DerivedStudent(config)``; ``DerivedStudent.create(inputs, out_dim, teacher) -> (module, architecture)``:

* teacher architecture known (``TeacherInfo.architecture`` of a built-in family): hidden widths /
  channels / ``d_model``·``ff`` / resnet ``width`` are multiplied by ``width`` (rounded, >= 1;
  ``d_model`` rounded to a multiple of ``heads``) and ⌈depth·n⌉ of the n hidden layers / blocks /
  encoder layers are kept (evenly spaced: every other one at 0.5). ``init: teacher`` then copies
  what still fits (:func:`students.init_from_teacher`).
* otherwise a teacher module that is a plain chain (``nn.Sequential``, eager or TorchScript, of
  Linear / Conv2d / BatchNorm / activation / Flatten / Dropout / pooling layers):
  :func:`rebuild_chain` makes an eager copy with weights, :func:`shrink_chain` shrinks it. With
  ``init: teacher`` each kept layer starts from the teacher's weights restricted to the units with
  the largest weight norms (neuron/channel selection), as long as its input is still the teacher's.
  The architecture is ``{"family": "sequential", "layers": [...]}``.
* anything else: ``EngineError("unsupported")`` naming the first layer type that is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.students import architecture, common, teacher_init
import jobspec
from engine.errors import InvalidSpec, Unsupported

_ACT_TYPES = {"ReLU": "relu", "GELU": "gelu", "Tanh": "tanh", "Sigmoid": "sigmoid", "ELU": "elu", "SiLU": "silu",
              "Softplus": "softplus", "Identity": "identity"}


def _scale(n: int, r: float) -> int:
    return max(1, int(round(n * r)))


def _keep(n: int, r: float) -> list[int]:
    """Indices of the ⌈r·n⌉ kept items out of n, evenly spaced from 0 (every other one at r = 0.5)."""
    if n <= 0:
        return []
    k = max(1, math.ceil(r * n - 1e-9))
    return sorted({(i * n) // k for i in range(k)})


class DerivedStudent:
    """Builds the shrunk teacher; ``config`` is the spec's ``derive`` ratios, ``init`` its weight source."""

    name = "derive"

    def __init__(self, config: jobspec.DerivedStudent):
        self.config = config.derive
        self.init = config.init

    def create(self, inputs: Any, out_dim: int, teacher: Any) -> tuple[nn.Module, dict[str, Any]]:
        if teacher is None:
            raise Unsupported("a derived student needs the teacher")
        arch = getattr(teacher, "architecture", None)
        module = getattr(teacher, "module", None)
        if isinstance(arch, Mapping) and arch.get("family") in ("mlp", "cnn", "resnet", "embedding_bag",
                                                                 "text_transformer"):
            new = derive_architecture(arch, self.config.width, self.config.depth, out_dim)
            model = architecture.from_architecture(new)
            if self.init == "teacher":
                if module is None:
                    raise Unsupported("init 'teacher' needs the teacher's weights")
                new["init_from_teacher"] = teacher_init.init_from_teacher(model, module)
            new["derived_from"] = arch.get("family")
            return model, new
        if module is None:
            raise Unsupported("cannot derive a student from an ONNX teacher without an architecture; "
                                             "choose a student family")
        inputs = common.normalize_inputs(inputs)
        if len(inputs) != 1:
            raise Unsupported("derive from a layer chain needs a single input")
        chain = rebuild_chain(module)
        return shrink_chain(chain, tuple(inputs[0].row_shape), self.config.width, self.config.depth,
                            init_teacher=self.init == "teacher", out_dim=out_dim)


def derive_architecture(arch: Mapping[str, Any], width: float, depth: float, out_dim: int) -> dict[str, Any]:
    """A built-in family's architecture dict, shrunk (see the module docstring)."""
    a = {k: v for k, v in arch.items() if k not in ("init_from_teacher", "derived_from", "source")}
    family = a["family"]
    a["out_features"] = int(out_dim)
    if family == "mlp":
        hidden = [int(h) for h in a.get("hidden", [128])]
        a["hidden"] = [_scale(hidden[i], width) for i in _keep(len(hidden), depth)]
    elif family == "cnn":
        ch = [int(c) for c in a.get("channels", [16, 32])]
        a["channels"] = [_scale(ch[i], width) for i in _keep(len(ch), depth)]
        hidden = [int(h) for h in a.get("hidden", [])]
        a["hidden"] = [_scale(hidden[i], width) for i in _keep(len(hidden), depth)]
    elif family == "resnet":
        a["width"] = _scale(int(a.get("width", 16)), width)
        a["depth"] = max(1, math.ceil(int(a.get("depth", 6)) * depth - 1e-9))
    elif family == "embedding_bag":
        a["embedding_dim"] = _scale(int(a.get("embedding_dim", 64)), width)
        hidden = [int(h) for h in a.get("hidden", [])]
        a["hidden"] = [_scale(hidden[i], width) for i in _keep(len(hidden), depth)]
    elif family == "text_transformer":
        heads = int(a.get("heads", 4))
        d_model = max(heads, int(round(int(a.get("d_model", 64)) * width / heads)) * heads)
        a["d_model"] = d_model
        a["ff"] = _scale(int(a.get("ff", 128)), width)
        a["layers"] = max(1, math.ceil(int(a.get("layers", 2)) * depth - 1e-9))
    return a


# ---- chains ----------------------------------------------------------------------------------------


def _leaves(module: nn.Module) -> list[nn.Module]:
    name = common._type_name(module)
    if name == "Sequential":
        out: list[nn.Module] = []
        for child in module.children():
            out += _leaves(child)
        return out
    return [module]


def _attr(m: nn.Module, name: str, default: Any = None) -> Any:
    try:
        return getattr(m, name)
    except (AttributeError, RuntimeError):
        return default


def _layer_dict(m: nn.Module) -> dict[str, Any] | None:
    t = common._type_name(m)
    if t == "Linear":
        return {"type": "linear", "in": int(m.weight.shape[1]), "out": int(m.weight.shape[0]),
                "bias": _attr(m, "bias") is not None}
    if t == "Conv2d":
        padding = _attr(m, "padding", 0)
        if isinstance(padding, str):
            return None
        return {"type": "conv2d", "in": int(m.weight.shape[1]) * int(_attr(m, "groups", 1)),
                "out": int(m.weight.shape[0]), "kernel_size": list(m.weight.shape[2:]),
                "stride": list(_attr(m, "stride", (1, 1))), "padding": list(padding),
                "dilation": list(_attr(m, "dilation", (1, 1))), "groups": int(_attr(m, "groups", 1)),
                "bias": _attr(m, "bias") is not None}
    if t in ("BatchNorm1d", "BatchNorm2d"):
        return {"type": t.lower(), "num_features": int(m.running_mean.shape[0]), "eps": float(_attr(m, "eps", 1e-5)),
                "momentum": _attr(m, "momentum", 0.1), "affine": _attr(m, "weight") is not None}
    if t in _ACT_TYPES:
        return {"type": _ACT_TYPES[t]}
    if t == "LeakyReLU":
        return {"type": "leakyrelu", "negative_slope": float(_attr(m, "negative_slope", 0.01))}
    if t == "Flatten":
        return {"type": "flatten", "start_dim": int(_attr(m, "start_dim", 1)), "end_dim": int(_attr(m, "end_dim", -1))}
    if t == "FloatFlatten":
        return {"type": "float_flatten", "start_dim": int(_attr(m, "start_dim", 1)),
                "end_dim": int(_attr(m, "end_dim", -1))}
    if t == "Unflatten":
        return {"type": "unflatten", "dim": int(_attr(m, "dim")), "sizes": [int(s) for s in _attr(m, "unflattened_size")]}
    if t == "Dropout":
        return {"type": "dropout", "p": float(_attr(m, "p", 0.5))}
    if t in ("MaxPool2d", "AvgPool2d"):
        def ints(v):
            return list(v) if isinstance(v, (list, tuple)) else int(v)

        return {"type": t.lower(), "kernel_size": ints(_attr(m, "kernel_size")), "stride": ints(_attr(m, "stride")),
                "padding": ints(_attr(m, "padding", 0))}
    if t == "AdaptiveAvgPool2d":
        size = _attr(m, "output_size")
        return {"type": "adaptiveavgpool2d", "output_size": list(size) if isinstance(size, (list, tuple)) else size}
    return None


def _chain_dicts(module: nn.Module) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    leaves = _leaves(module)
    dicts = []
    for leaf in leaves:
        d = _layer_dict(leaf)
        if d is None:
            raise Unsupported(
                f"cannot derive a student from this teacher: layer type {common._type_name(leaf)!r} is not supported "
                "(a plain chain of Linear/Conv2d/BatchNorm/activation/Flatten/Dropout/pooling layers is)",
            )
        dicts.append(d)
    return leaves, dicts


def rebuild_chain(module: nn.Module) -> nn.Sequential:
    """An eager ``nn.Sequential`` copy, with weights, of a plain layer chain (eager or TorchScript).

    Nested Sequentials are flattened. Anything else raises ``EngineError("unsupported")`` naming the
    first unsupported layer type. The copy's architecture is :func:`chain_architecture`.
    """
    leaves, dicts = _chain_dicts(module)
    seq = architecture.build_sequential({"layers": dicts})
    with torch.no_grad():
        for src, dst in zip(leaves, seq):
            dst_state = dst.state_dict()
            src_state = dict(src.state_dict())
            for k, v in dst_state.items():
                v.copy_(src_state[k].to(v.dtype))
    seq.train(module.training)
    return seq


def chain_architecture(seq: nn.Sequential) -> dict[str, Any]:
    return {"family": "sequential", "layers": _chain_dicts(seq)[1]}


def shrink_chain(chain: nn.Sequential, input_shape: tuple[int, ...], width: float, depth: float, *,
                 init_teacher: bool, out_dim: int | None = None) -> tuple[nn.Sequential, dict[str, Any]]:
    """Shrink a rebuilt chain: hidden Linear/Conv widths × ``width``, ⌈depth·n⌉ hidden blocks kept.

    A block is a Linear/Conv2d plus the layers up to the next one; the last one (the head) keeps
    its output width. Input widths follow from a dummy forward pass, so dropped blocks and
    flattened conv maps need no bookkeeping.
    """
    leaves, dicts = _chain_dicts(chain)
    weight_idx = [i for i, d in enumerate(dicts) if d["type"] in ("linear", "conv2d")]
    if not weight_idx:
        raise Unsupported("the teacher chain has no Linear or Conv2d layer")
    if any(dicts[i].get("groups", 1) != 1 for i in weight_idx):
        raise Unsupported("cannot derive from a chain with grouped convolutions")
    n_hidden = len(weight_idx) - 1
    kept = set(_keep(n_hidden, depth))
    plan: list[tuple[int, bool]] = [(i, False) for i in range(weight_idx[0])]  # (layer index, is hidden weight)
    for b, start in enumerate(weight_idx):
        end = weight_idx[b + 1] if b + 1 < len(weight_idx) else len(dicts)
        head = b == n_hidden
        if head or b in kept:
            plan += [(i, i == start and not head) for i in range(start, end)]
        else:  # dropped block: keep only reshaping layers
            plan += [(i, False) for i in range(start, end) if dicts[i]["type"] in ("flatten", "float_flatten",
                                                                                     "unflatten")]
    x = torch.zeros(2, *input_shape)
    layers: list[nn.Module] = []
    out_dicts: list[dict[str, Any]] = []
    copied: list[str] = []
    sel: torch.Tensor | None = torch.arange(input_shape[0]) if len(input_shape) else None
    prev = -1
    with torch.no_grad():
        for pos, (i, hidden) in enumerate(plan):
            d = dict(dicts[i])
            src = leaves[i]
            contiguous = i == prev + 1
            prev = i
            if not contiguous:
                sel = None
            if d["type"] in ("linear", "conv2d"):
                width_in = int(x.shape[1]) if d["type"] == "conv2d" else int(x.shape[-1])
                d["in"] = width_in
                if hidden:
                    d["out"] = _scale(int(d["out"]), width)
                elif out_dim is not None and i == weight_idx[-1]:
                    d["out"] = int(out_dim)
            elif d["type"] in ("batchnorm1d", "batchnorm2d"):
                d["num_features"] = int(x.shape[1])
            layer = architecture._layer_from_dict(d)
            name = str(pos)
            if init_teacher:
                sel = _init_slice(layer, src, d, sel, x, copied, name)
            layer.eval()
            x = layer(x)
            layers.append(layer)
            out_dicts.append(d)
    model = nn.Sequential(*layers)
    arch = {"family": "sequential", "layers": out_dicts, "input_shape": list(input_shape), "derived_from": "chain"}
    if init_teacher:
        arch["init_from_teacher"] = copied
    return model.train(), arch


def _init_slice(layer: nn.Module, src: nn.Module, d: dict, sel: torch.Tensor | None, x: torch.Tensor,
                copied: list[str], name: str) -> torch.Tensor | None:
    """Copy the teacher layer restricted to the input units ``sel`` and the strongest output units.

    Returns the teacher indices of the new layer's output channels (None once they no longer
    correspond to the teacher's)."""
    t = d["type"]
    if t in ("linear", "conv2d"):
        w = src.weight.detach()
        if sel is None or len(sel) != layer.weight.shape[1] or int(sel.max()) >= w.shape[1]:
            return None
        n_out = layer.weight.shape[0]
        norms = w.reshape(w.shape[0], -1).norm(dim=1)
        keep = torch.arange(w.shape[0]) if n_out == w.shape[0] else torch.sort(
            torch.topk(norms, n_out).indices).values
        layer.weight.copy_(w[keep][:, sel].to(layer.weight.dtype))
        copied.append(f"{name}.weight")
        if layer.bias is not None and src.bias is not None:
            layer.bias.copy_(src.bias.detach()[keep].to(layer.bias.dtype))
            copied.append(f"{name}.bias")
        return keep
    if t in ("batchnorm1d", "batchnorm2d"):
        if sel is None:
            return None
        for key, value in src.state_dict().items():
            target = getattr(layer, key, None)
            if target is None or not torch.is_tensor(target):
                continue
            target.copy_(value if value.dim() == 0 else value[sel])
            copied.append(f"{name}.{key}")
        return sel
    if t in ("flatten", "float_flatten"):
        if sel is None or x.dim() <= 2:
            return sel
        per = int(math.prod(x.shape[2:]))
        return (sel[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
    if t == "unflatten":
        return None
    return sel


def num_parameters(model: nn.Module) -> int:
    return common.num_parameters(model)


def build(config: jobspec.DerivedStudent | Mapping[str, Any]) -> DerivedStudent:
    """The derived-student builder for ``{"derive": {...}, "init": ...}`` (validated by the spec's model)."""
    from pydantic import ValidationError

    import jobspec.base

    if not isinstance(config, jobspec.DerivedStudent):
        try:
            config = jobspec.DerivedStudent.model_validate(dict(config))
        except ValidationError as exc:
            raise InvalidSpec(f"student: {jobspec.base.validation_message(exc)}") from None
    return DerivedStudent(config)
