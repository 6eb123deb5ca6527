"""Reading a ``torch.export`` graph (``ExportedProgram.module()``, an ``fx.GraphModule``) as a chain of
eager layers.

``from_fx(gm) -> list[nn.Module]``: the graph's ``call_function`` nodes (``aten.linear``,
``aten.conv2d``, ``aten.relu``, ...) must form a chain from the single input to the output; weights are
the ``get_attr`` tensors. ``fx_example(gm)``: a random input shaped as the recorded one (dynamic dims 2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.compression.editable_chain import tup, unsupported


_FX_IGNORED_MODULES = ("_guards_fn",)


def _fx_op_name(target: Any) -> str:
    """``aten.relu.default`` -> ``relu``; in-place variants lose their trailing ``_``."""
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        name = packet.__name__
    name = name.split(".")[0]
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _fetch(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach().clone()


def fx_example(gm: torch.fx.GraphModule) -> tuple[torch.Tensor, ...] | None:
    """A random tensor shaped as the graph's first input (dynamic dimensions as 2), or None."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = [int(s) if isinstance(s, int) else 2 for s in val.shape]
                return (torch.randn(*shape),)
    return None


def from_fx(gm: torch.fx.GraphModule) -> list[nn.Module]:
    """The eager layers, in order, of a torch.export chain; see the module docstring."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise unsupported("torch.export", f"{len(placeholders)} inputs")
    tensors: dict[Any, torch.Tensor] = {}
    current = placeholders[0]
    layers: list[nn.Module] = []
    getitem_src: dict[Any, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            tensors[node] = _fetch(gm, node.target)
        elif node.op == "placeholder":
            continue
        elif node.op == "call_module" and node.target in _FX_IGNORED_MODULES:
            continue
        elif node.op == "call_function":
            if node.target is __import__("operator").getitem:
                # _native_batch_norm_legit_no_training returns a tuple; item 0 continues the chain
                if node.args[0] is current and node.args[1] == 0:
                    current = node
                    continue
                if node.args[0] in getitem_src:
                    continue
                raise unsupported("torch.export", "op getitem")
            op = _fx_op_name(node.target)
            args = list(node.args)
            if not args or args[0] is not current:
                raise unsupported("torch.export", f"op {node.target} outside the layer chain (a branch or merge)")
            for a in args[1:]:
                if isinstance(a, torch.fx.Node) and a not in tensors:
                    raise unsupported("torch.export", f"op {node.target} combining two activations")
            vals = [None] + [tensors[a] if isinstance(a, torch.fx.Node) else a for a in args[1:]]
            val = current.meta.get("val")
            rank = val.dim() if isinstance(val, torch.Tensor) else None
            layer = _fx_layer(op, vals, dict(node.kwargs), node.target, rank)
            if layer is not None:
                layers.append(layer)
            if op == "_native_batch_norm_legit_no_training":
                getitem_src[node] = True
            current = node
        elif node.op == "output":
            out = node.args[0]
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            if out is not current:
                raise unsupported("torch.export", "an output that is not the last layer's result")
        else:
            raise unsupported("torch.export", f"{node.op} {node.target}")
    return layers


def _arg(vals: list[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if index < len(vals):
        return vals[index]
    return kwargs.get(name, default)


def _fx_layer(op: str, v: list[Any], kw: dict[str, Any], target: Any, rank: int | None = None) -> nn.Module | None:
    if op == "linear":
        w, b = v[1], _arg(v, kw, 2, "bias", None)
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        _set(layer, weight=w, bias=b)
        return layer
    if op in ("conv1d", "conv2d"):
        w, b = v[1], _arg(v, kw, 2, "bias", None)
        groups = int(_arg(v, kw, 6, "groups", 1))
        cls = nn.Conv1d if op == "conv1d" else nn.Conv2d
        padding = _arg(v, kw, 4, "padding", 0)
        layer = cls(
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=tup(list(_as_list(_arg(v, kw, 3, "stride", 1)))),
            padding=padding if isinstance(padding, str) else tup(list(_as_list(padding))),
            dilation=tup(list(_as_list(_arg(v, kw, 5, "dilation", 1)))),
            groups=groups,
            bias=b is not None,
        )
        _set(layer, weight=w, bias=b)
        return layer
    if op in ("batch_norm", "_native_batch_norm_legit_no_training"):
        # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        # _native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
        w, b, mean, var = v[1], v[2], v[3], v[4]
        if op == "batch_norm":
            if _arg(v, kw, 5, "training", False):
                raise unsupported("torch.export", "batch_norm in training mode")
            momentum, eps = _arg(v, kw, 6, "momentum", 0.1), _arg(v, kw, 7, "eps", 1e-5)
        else:
            momentum, eps = _arg(v, kw, 5, "momentum", 0.1), _arg(v, kw, 6, "eps", 1e-5)
        # BatchNorm1d and 2d compute the same thing in eval mode; the input rank picks the class.
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(rank or 0, _AnyBatchNorm)
        layer = cls(mean.shape[0], eps=float(eps), momentum=float(momentum), affine=w is not None)
        _set(layer, weight=w, bias=b, running_mean=mean, running_var=var)
        return layer
    if op == "layer_norm":
        shape, w, b = v[1], _arg(v, kw, 2, "weight", None), _arg(v, kw, 3, "bias", None)
        layer = nn.LayerNorm(tuple(shape), eps=float(_arg(v, kw, 4, "eps", 1e-5)), elementwise_affine=w is not None,
                             bias=b is not None)
        _set(layer, weight=w, bias=b)
        return layer
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
    if op in simple:
        return simple[op]()
    if op == "gelu":
        return nn.GELU(approximate=kw.get("approximate", v[1] if len(v) > 1 else "none"))
    if op == "leaky_relu":
        return nn.LeakyReLU(float(_arg(v, kw, 1, "negative_slope", 0.01)))
    if op == "flatten":
        return nn.Flatten(int(_arg(v, kw, 1, "start_dim", 0)), int(_arg(v, kw, 2, "end_dim", -1)))
    if op in ("dropout", "clone", "alias", "detach", "contiguous"):
        return None  # identity at inference
    if op in ("max_pool1d", "max_pool2d"):
        cls = nn.MaxPool1d if op == "max_pool1d" else nn.MaxPool2d
        stride = _arg(v, kw, 2, "stride", [])
        return cls(
            tup(list(_as_list(v[1]))),
            stride=tup(list(_as_list(stride))) if stride else None,
            padding=tup(list(_as_list(_arg(v, kw, 3, "padding", 0)))),
            dilation=tup(list(_as_list(_arg(v, kw, 4, "dilation", 1)))),
            ceil_mode=bool(_arg(v, kw, 5, "ceil_mode", False)),
        )
    if op in ("avg_pool1d", "avg_pool2d"):
        cls = nn.AvgPool1d if op == "avg_pool1d" else nn.AvgPool2d
        stride = _arg(v, kw, 2, "stride", [])
        kwargs: dict[str, Any] = dict(
            stride=tup(list(_as_list(stride))) if stride else None,
            padding=tup(list(_as_list(_arg(v, kw, 3, "padding", 0)))),
            ceil_mode=bool(_arg(v, kw, 4, "ceil_mode", False)),
            count_include_pad=bool(_arg(v, kw, 5, "count_include_pad", True)),
        )
        if op == "avg_pool2d":
            kwargs["divisor_override"] = _arg(v, kw, 6, "divisor_override", None)
        return cls(tup(list(_as_list(v[1]))), **kwargs)
    if op in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):
        cls = nn.AdaptiveAvgPool1d if op == "adaptive_avg_pool1d" else nn.AdaptiveAvgPool2d
        return cls(tup(list(_as_list(v[1]))))
    raise unsupported("torch.export", f"op {target}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _AnyBatchNorm(nn.BatchNorm1d):
    """BatchNorm over dim 1 for any rank (eval-mode BatchNorm1d/2d are the same op)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _set(layer: nn.Module, **tensors: torch.Tensor | None) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is None:
                continue
            getattr(layer, name).copy_(value)
