"""Reading a TorchScript module (``torch.jit.script`` or ``torch.jit.trace``) as a chain of eager layers.

``from_script(module) -> list[nn.Module]``: the module's ``forward`` graph must only call its children's
``forward`` one after the other (``prim::CallMethod`` chain; nested containers recurse). Children are
identified by ``original_name`` ("Linear", "Conv2d", ...); hyperparameters come from the scripted
module's constants (``stride``, ``eps``, ...) or, for traced modules, from the constant arguments of the
single aten call in the child's graph; weights are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.compression.editable_chain import SUPPORTED, tup, unsupported


def from_script(module: torch.jit.ScriptModule) -> list[nn.Module]:
    """The eager layers, in order, of a TorchScript chain; see the module docstring."""
    name = module.original_name
    children = dict(module.named_children())
    if not children:
        return [_script_leaf(module)]
    graph = module.graph
    inputs = [i for i in graph.inputs()][1:]  # drop self
    if len(inputs) != 1:
        raise unsupported("TorchScript", f"{name}.forward with {len(inputs)} inputs")
    attr_of: dict[Any, str] = {}
    current = inputs[0]
    layers: list[nn.Module] = []
    for node in graph.nodes():
        kind = node.kind()
        if kind == "prim::GetAttr":
            attr_of[node.output()] = node.s("name")
        elif kind in ("prim::Constant", "prim::ListConstruct"):
            continue
        elif kind == "prim::CallMethod" and node.s("name") == "forward":
            args = list(node.inputs())
            if len(args) != 2 or args[0] not in attr_of:
                raise unsupported("TorchScript", f"a call with {len(args) - 1} arguments in {name}.forward")
            if args[1] is not current:
                raise unsupported("TorchScript", f"a branch (submodule {attr_of[args[0]]!r} does not take the previous "
                                                  f"layer's output) in {name}.forward")
            layers.extend(from_script(children[attr_of[args[0]]]))
            current = node.output()
        else:
            raise unsupported("TorchScript", f"op {kind} in {name}.forward")
    returned = list(graph.return_node().inputs())
    if len(returned) != 1 or returned[0] is not current:
        raise unsupported("TorchScript", f"an output that is not the last layer's result in {name}.forward")
    return layers


def _aten_node(module: torch.jit.ScriptModule, ops: tuple[str, ...]) -> list[Any] | None:
    """Constant arguments (None for non-constants) of the first aten op in ``ops`` of a traced leaf."""
    try:
        graph = module.graph
    except Exception:  # noqa: BLE001
        return None
    for node in graph.nodes():
        if node.kind() in ops:
            return [_const(v) for v in node.inputs()]
    return None


def _const(value: Any) -> Any:
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [_const(v) for v in node.inputs()]
    return None


def _attr(module: Any, name: str, traced: list[Any] | None, index: int, default: Any = None) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        pass
    if traced is not None and index < len(traced) and traced[index] is not None:
        return traced[index]
    return default


def _script_leaf(m: torch.jit.ScriptModule) -> nn.Module:
    name = m.original_name
    params = {k: v.detach().clone() for k, v in m.named_parameters(recurse=False)}
    buffers = {k: v.detach().clone() for k, v in m.named_buffers(recurse=False)}
    if name not in SUPPORTED:
        raise unsupported("TorchScript", f"layer {name}")
    if name == "Linear":
        w = params["weight"]
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
    elif name in ("Conv1d", "Conv2d"):
        t = _aten_node(m, ("aten::_convolution", "aten::conv1d", "aten::conv2d"))
        w = params["weight"]
        conv_t = "aten::_convolution"
        ops_kind = None
        if t is not None:
            ops_kind = next(n.kind() for n in m.graph.nodes() if n.kind() in (conv_t, "aten::conv1d", "aten::conv2d"))
        if ops_kind == conv_t:  # input, weight, bias, stride, padding, dilation, transposed, output_padding, groups
            idx = {"stride": 3, "padding": 4, "dilation": 5, "groups": 8}
        else:  # input, weight, bias, stride, padding, dilation, groups
            idx = {"stride": 3, "padding": 4, "dilation": 5, "groups": 6}
        groups = int(_attr(m, "groups", t, idx["groups"], 1))
        padding_mode = _attr(m, "padding_mode", None, 0, "zeros")
        cls = nn.Conv1d if name == "Conv1d" else nn.Conv2d
        layer = cls(
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=tuple(_attr(m, "stride", t, idx["stride"], 1)),
            padding=_attr(m, "padding", t, idx["padding"], 0),
            dilation=tuple(_attr(m, "dilation", t, idx["dilation"], 1)),
            groups=groups,
            bias="bias" in params,
            padding_mode=padding_mode,
        )
    elif name in ("BatchNorm1d", "BatchNorm2d"):
        t = _aten_node(m, ("aten::batch_norm",))
        features = buffers["running_mean"].shape[0]
        cls = nn.BatchNorm1d if name == "BatchNorm1d" else nn.BatchNorm2d
        layer = cls(features, eps=float(_attr(m, "eps", t, 7, 1e-5)), momentum=_attr(m, "momentum", t, 6, 0.1),
                    affine="weight" in params)
    elif name == "LayerNorm":
        t = _aten_node(m, ("aten::layer_norm",))
        shape = tuple(_attr(m, "normalized_shape", t, 1))
        layer = nn.LayerNorm(shape, eps=float(_attr(m, "eps", t, 4, 1e-5)), elementwise_affine="weight" in params)
    elif name == "GELU":
        layer = nn.GELU(approximate=_attr(m, "approximate", _aten_node(m, ("aten::gelu",)), 1, "none"))
    elif name == "LeakyReLU":
        layer = nn.LeakyReLU(float(_attr(m, "negative_slope", _aten_node(m, ("aten::leaky_relu", "aten::leaky_relu_")), 1, 0.01)))
    elif name == "Flatten":
        t = _aten_node(m, ("aten::flatten",))
        layer = nn.Flatten(int(_attr(m, "start_dim", t, 1, 1)), int(_attr(m, "end_dim", t, 2, -1)))
    elif name == "Dropout":
        layer = nn.Dropout(float(_attr(m, "p", _aten_node(m, ("aten::dropout", "aten::dropout_")), 1, 0.5)))
    elif name in ("MaxPool1d", "MaxPool2d"):
        t = _aten_node(m, ("aten::max_pool1d", "aten::max_pool2d"))
        cls = nn.MaxPool1d if name == "MaxPool1d" else nn.MaxPool2d
        layer = cls(
            tup(_attr(m, "kernel_size", t, 1)),
            stride=tup(_attr(m, "stride", t, 2)) or None,
            padding=tup(_attr(m, "padding", t, 3, 0)),
            dilation=tup(_attr(m, "dilation", t, 4, 1)),
            ceil_mode=bool(_attr(m, "ceil_mode", t, 5, False)),
        )
    elif name in ("AvgPool1d", "AvgPool2d"):
        t = _aten_node(m, ("aten::avg_pool1d", "aten::avg_pool2d"))
        cls = nn.AvgPool1d if name == "AvgPool1d" else nn.AvgPool2d
        kwargs: dict[str, Any] = dict(
            stride=tup(_attr(m, "stride", t, 2)) or None,
            padding=tup(_attr(m, "padding", t, 3, 0)),
            ceil_mode=bool(_attr(m, "ceil_mode", t, 4, False)),
            count_include_pad=bool(_attr(m, "count_include_pad", t, 5, True)),
        )
        if name == "AvgPool2d":
            kwargs["divisor_override"] = _attr(m, "divisor_override", t, 6, None)
        layer = cls(tup(_attr(m, "kernel_size", t, 1)), **kwargs)
    elif name in ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d"):
        t = _aten_node(m, ("aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d"))
        cls = nn.AdaptiveAvgPool1d if name == "AdaptiveAvgPool1d" else nn.AdaptiveAvgPool2d
        layer = cls(tup(_attr(m, "output_size", t, 1)))
    else:
        layer = getattr(nn, name)()
    _load(layer, params, buffers, name)
    return layer


def _load(layer: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], name: str) -> None:
    state = {**params, **buffers}
    expected = set(layer.state_dict())
    if set(state) - expected:
        raise unsupported("TorchScript", f"layer {name} with extra tensors {sorted(set(state) - expected)}")
    with torch.no_grad():
        layer.load_state_dict(state, strict=False)
