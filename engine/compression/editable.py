"""Turn a loaded teacher (TorchScript, torch.export, eager) into an editable eager ``nn.Sequential``.

Pruning and quantization need real ``nn.Module`` layers with parameters they can
mask, slice or swap. Uploaded teachers arrive as TorchScript (``torch.jit.script``
or ``torch.jit.trace``) or as a ``torch.export`` program; both are read-only
graphs. :func:`to_editable` rebuilds such a model as an eager ``nn.Sequential``
with the same weights when -- and only when -- its graph is a plain chain of
supported layers (:data:`SUPPORTED`), and checks the rebuilt model numerically on
a random input. Anything else (a residual add, a concat, a custom layer, two
inputs) raises ``EngineError("unsupported", ...)`` naming what is in the way.

How each format is read:

- TorchScript: the module's ``forward`` graph must only call its children's
  ``forward`` one after the other (``prim::CallMethod`` chain; nested containers
  recurse). Children are identified by ``original_name`` ("Linear", "Conv2d",
  ...); hyperparameters come from the scripted module's constants (``stride``,
  ``eps``, ...) or, for traced modules, from the constant arguments of the single
  aten call in the child's graph.
- torch.export: ``ExportedProgram`` or ``ExportedProgram.module()``; the graph's
  ``call_function`` nodes (``aten.linear``, ``aten.conv2d``, ``aten.relu``, ...)
  must form a chain from the single input to the output; weights are the
  ``get_attr`` tensors.
- eager: an ``nn.Sequential`` (nested ones are flattened) of supported layers is
  deep-copied; any other eager module is exported with ``torch.export`` (needs
  ``example_inputs`` or a first Linear/Conv layer to infer an input) and read as
  above.

Imports only torch and the engine's types.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from engine.errors import EngineError

#: Layer types an editable chain may contain (``original_name`` / class names).
SUPPORTED = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "LayerNorm",
    "ReLU",
    "GELU",
    "Tanh",
    "Sigmoid",
    "SiLU",
    "LeakyReLU",
    "Flatten",
    "Dropout",
    "MaxPool1d",
    "MaxPool2d",
    "AvgPool1d",
    "AvgPool2d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "Identity",
)
_SUPPORTED_TEXT = ("Linear, Conv1d, Conv2d, BatchNorm, LayerNorm, ReLU/GELU/Tanh/Sigmoid/SiLU/LeakyReLU, Flatten, Dropout, "
                   "MaxPool, AvgPool, AdaptiveAvgPool in a single chain")
_CONTAINERS = ("Sequential",)


def _unsupported(kind: str, what: str) -> EngineError:
    return EngineError("unsupported", f"this {kind} model cannot be edited: it contains {what}; supported: {_SUPPORTED_TEXT}")


def to_editable(module: Any, example_inputs: Sequence[torch.Tensor] | None = None, *, atol: float = 1e-4) -> nn.Sequential:
    """An eager ``nn.Sequential`` equivalent to ``module`` with copies of its weights.

    ``module``: a TorchScript module, a ``torch.export.ExportedProgram`` (or its
    ``.module()``), or an eager module. ``example_inputs`` (one tensor in a
    tuple) is used for the numeric check (and to export eager non-Sequential
    modules); by default a random batch is built from the first layer's shape
    (``[2, in_features]``, ``[2, C, 32]``, ``[2, C, 16, 16]``) or from the
    export's recorded input shape. The result is in eval mode.

    Raises ``EngineError("unsupported")`` naming the op/layer when the model is
    not such a chain, or when the rebuilt model does not reproduce the outputs.
    """
    if isinstance(module, torch.jit.ScriptModule):
        kind = "TorchScript"
        layers = _from_script(module)
        reference: Callable = module
    elif isinstance(module, torch.export.ExportedProgram):
        kind = "torch.export"
        gm = module.module()
        layers = _from_fx(gm)
        reference = gm
        example_inputs = example_inputs or _fx_example(gm)
    elif isinstance(module, torch.fx.GraphModule):
        kind = "torch.export"
        layers = _from_fx(module)
        reference = module
        example_inputs = example_inputs or _fx_example(module)
    elif isinstance(module, nn.Module):
        kind = "eager"
        reference = module
        if isinstance(module, nn.Sequential):
            layers = _from_eager_sequential(module)
        else:
            example_inputs = example_inputs or _infer_example(module)
            if example_inputs is None:
                raise _unsupported(kind, f"a custom module {type(module).__name__} with no Linear/Conv input layer")
            was_training = module.training
            module.eval()
            try:
                gm = torch.export.export(module, tuple(example_inputs)).module()
            except Exception as exc:  # noqa: BLE001 - any export failure means "not editable"
                raise _unsupported(kind, f"a module torch.export cannot trace ({type(exc).__name__}: {str(exc)[:200]})") from None
            finally:
                module.train(was_training)
            layers = _from_fx(gm)
    else:
        raise EngineError("unsupported", f"cannot edit a {type(module).__name__}; expected a torch module")

    result = nn.Sequential(*layers).eval()
    _verify(reference, result, example_inputs, kind, atol)
    return result


# --------------------------------------------------------------------------- eager


def _from_eager_sequential(seq: nn.Sequential) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for child in seq.children():
        name = type(child).__name__
        if isinstance(child, nn.Sequential):
            layers.extend(_from_eager_sequential(child))
        elif name in SUPPORTED and type(child).__module__.startswith("torch.nn"):
            layers.append(copy.deepcopy(child))
        else:
            raise _unsupported("eager", f"layer {name}")
    return layers


# --------------------------------------------------------------------- TorchScript


def _from_script(module: torch.jit.ScriptModule) -> list[nn.Module]:
    name = module.original_name
    children = dict(module.named_children())
    if not children:
        return [_script_leaf(module)]
    graph = module.graph
    inputs = [i for i in graph.inputs()][1:]  # drop self
    if len(inputs) != 1:
        raise _unsupported("TorchScript", f"{name}.forward with {len(inputs)} inputs")
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
                raise _unsupported("TorchScript", f"a call with {len(args) - 1} arguments in {name}.forward")
            if args[1] is not current:
                raise _unsupported("TorchScript", f"a branch (submodule {attr_of[args[0]]!r} does not take the previous "
                                                  f"layer's output) in {name}.forward")
            layers.extend(_from_script(children[attr_of[args[0]]]))
            current = node.output()
        else:
            raise _unsupported("TorchScript", f"op {kind} in {name}.forward")
    returned = list(graph.return_node().inputs())
    if len(returned) != 1 or returned[0] is not current:
        raise _unsupported("TorchScript", f"an output that is not the last layer's result in {name}.forward")
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
        raise _unsupported("TorchScript", f"layer {name}")
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
            _tup(_attr(m, "kernel_size", t, 1)),
            stride=_tup(_attr(m, "stride", t, 2)) or None,
            padding=_tup(_attr(m, "padding", t, 3, 0)),
            dilation=_tup(_attr(m, "dilation", t, 4, 1)),
            ceil_mode=bool(_attr(m, "ceil_mode", t, 5, False)),
        )
    elif name in ("AvgPool1d", "AvgPool2d"):
        t = _aten_node(m, ("aten::avg_pool1d", "aten::avg_pool2d"))
        cls = nn.AvgPool1d if name == "AvgPool1d" else nn.AvgPool2d
        kwargs: dict[str, Any] = dict(
            stride=_tup(_attr(m, "stride", t, 2)) or None,
            padding=_tup(_attr(m, "padding", t, 3, 0)),
            ceil_mode=bool(_attr(m, "ceil_mode", t, 4, False)),
            count_include_pad=bool(_attr(m, "count_include_pad", t, 5, True)),
        )
        if name == "AvgPool2d":
            kwargs["divisor_override"] = _attr(m, "divisor_override", t, 6, None)
        layer = cls(_tup(_attr(m, "kernel_size", t, 1)), **kwargs)
    elif name in ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d"):
        t = _aten_node(m, ("aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d"))
        cls = nn.AdaptiveAvgPool1d if name == "AdaptiveAvgPool1d" else nn.AdaptiveAvgPool2d
        layer = cls(_tup(_attr(m, "output_size", t, 1)))
    else:
        layer = getattr(nn, name)()
    _load(layer, params, buffers, name)
    return layer


def _tup(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if len(value) == 1 else tuple(value)
    return value


def _load(layer: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], name: str) -> None:
    state = {**params, **buffers}
    expected = set(layer.state_dict())
    if set(state) - expected:
        raise _unsupported("TorchScript", f"layer {name} with extra tensors {sorted(set(state) - expected)}")
    with torch.no_grad():
        layer.load_state_dict(state, strict=False)


# -------------------------------------------------------------------- torch.export

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


def _fx_example(gm: torch.fx.GraphModule) -> tuple[torch.Tensor, ...] | None:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = [int(s) if isinstance(s, int) else 2 for s in val.shape]
                return (torch.randn(*shape),)
    return None


def _from_fx(gm: torch.fx.GraphModule) -> list[nn.Module]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _unsupported("torch.export", f"{len(placeholders)} inputs")
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
                raise _unsupported("torch.export", "op getitem")
            op = _fx_op_name(node.target)
            args = list(node.args)
            if not args or args[0] is not current:
                raise _unsupported("torch.export", f"op {node.target} outside the layer chain (a branch or merge)")
            for a in args[1:]:
                if isinstance(a, torch.fx.Node) and a not in tensors:
                    raise _unsupported("torch.export", f"op {node.target} combining two activations")
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
                raise _unsupported("torch.export", "an output that is not the last layer's result")
        else:
            raise _unsupported("torch.export", f"{node.op} {node.target}")
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
            stride=_tup(list(_as_list(_arg(v, kw, 3, "stride", 1)))),
            padding=padding if isinstance(padding, str) else _tup(list(_as_list(padding))),
            dilation=_tup(list(_as_list(_arg(v, kw, 5, "dilation", 1)))),
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
                raise _unsupported("torch.export", "batch_norm in training mode")
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
            _tup(list(_as_list(v[1]))),
            stride=_tup(list(_as_list(stride))) if stride else None,
            padding=_tup(list(_as_list(_arg(v, kw, 3, "padding", 0)))),
            dilation=_tup(list(_as_list(_arg(v, kw, 4, "dilation", 1)))),
            ceil_mode=bool(_arg(v, kw, 5, "ceil_mode", False)),
        )
    if op in ("avg_pool1d", "avg_pool2d"):
        cls = nn.AvgPool1d if op == "avg_pool1d" else nn.AvgPool2d
        stride = _arg(v, kw, 2, "stride", [])
        kwargs: dict[str, Any] = dict(
            stride=_tup(list(_as_list(stride))) if stride else None,
            padding=_tup(list(_as_list(_arg(v, kw, 3, "padding", 0)))),
            ceil_mode=bool(_arg(v, kw, 4, "ceil_mode", False)),
            count_include_pad=bool(_arg(v, kw, 5, "count_include_pad", True)),
        )
        if op == "avg_pool2d":
            kwargs["divisor_override"] = _arg(v, kw, 6, "divisor_override", None)
        return cls(_tup(list(_as_list(v[1]))), **kwargs)
    if op in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):
        cls = nn.AdaptiveAvgPool1d if op == "adaptive_avg_pool1d" else nn.AdaptiveAvgPool2d
        return cls(_tup(list(_as_list(v[1]))))
    raise _unsupported("torch.export", f"op {target}")


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


# ------------------------------------------------------------------------ checking


def _infer_example(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(2, m.in_channels, 32),)
        if isinstance(m, nn.Conv2d):
            return (torch.randn(2, m.in_channels, 16, 16),)
    return None


def _verify(reference: Callable, result: nn.Sequential, example_inputs: Sequence[torch.Tensor] | None, kind: str,
            atol: float) -> None:
    candidates: list[tuple[torch.Tensor, ...]] = []
    if example_inputs is not None:
        candidates.append(tuple(example_inputs))
    else:
        inferred = _infer_example(result)
        if inferred is not None:
            x = inferred[0]
            candidates.append(inferred)
            if x.dim() == 4:  # image models: try a few common sizes until one fits the chain
                candidates += [(torch.randn(2, x.shape[1], s, s),) for s in (8, 28, 32, 64, 224)]
    if not candidates:
        return
    errors = []
    for inputs in candidates:
        try:
            with torch.no_grad():
                want = reference(*inputs)
                got = result(*inputs)
        except Exception as exc:  # noqa: BLE001 - input shape guesses may not fit
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        if isinstance(want, (tuple, list)) and len(want) == 1:
            want = want[0]
        if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(want, got, atol=atol, rtol=1e-4):
            diff = (want - got).abs().max().item() if isinstance(want, torch.Tensor) and want.shape == got.shape else "shape"
            raise EngineError("unsupported",
                              f"this {kind} model could not be rebuilt as an editable chain: outputs differ ({diff})")
        return
    if example_inputs is not None:
        raise EngineError("unsupported", f"this {kind} model could not be checked after rebuilding: {errors[0]}")
    # No guessed input fits (e.g. a CNN with a fixed flatten size): the caller should pass example_inputs.
    raise EngineError("unsupported",
                      f"this {kind} model could not be checked after rebuilding (pass example_inputs): {errors[-1]}")
