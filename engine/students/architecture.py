"""Architecture dicts back into modules: :func:`from_architecture` rebuilds any student the engine made
(a family, a derived ``sequential`` chain, an input-reduction wrapper) so safetensors weights reload
without the spec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from engine.errors import InvalidModel, Unsupported
from engine.students.families import (
    FloatFlatten,
    build_cnn,
    build_embedding_bag,
    build_mlp,
    build_resnet,
    build_text_transformer,
)
# ---- sequential (derived chains) -----------------------------------------------------------------


def build_sequential(architecture: Mapping[str, Any]) -> nn.Sequential:
    """A chain from ``{"family": "sequential", "layers": [...]}``; layer dicts by ``type``:

    ``linear`` (in, out, bias), ``conv2d`` (in, out, kernel_size, stride, padding, dilation, groups, bias),
    ``batchnorm1d``/``batchnorm2d`` (num_features, eps, momentum, affine), ``relu``, ``gelu``, ``tanh``,
    ``sigmoid``, ``leakyrelu`` (negative_slope), ``elu``, ``silu``, ``softplus``, ``identity``, ``flatten``
    (start_dim, end_dim), ``float_flatten``, ``unflatten`` (dim, sizes), ``dropout`` (p), ``maxpool2d`` /
    ``avgpool2d`` (kernel_size, stride, padding), ``adaptiveavgpool2d`` (output_size).
    """
    return nn.Sequential(*[_layer_from_dict(d) for d in architecture["layers"]])


_SIMPLE = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
           "silu": nn.SiLU, "softplus": nn.Softplus, "identity": nn.Identity}


def _pair(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _layer_from_dict(d: Mapping[str, Any]) -> nn.Module:
    t = d.get("type")
    if t == "linear":
        return nn.Linear(int(d["in"]), int(d["out"]), bias=bool(d.get("bias", True)))
    if t == "conv2d":
        return nn.Conv2d(int(d["in"]), int(d["out"]), _pair(d["kernel_size"]), stride=_pair(d.get("stride", 1)),
                         padding=_pair(d.get("padding", 0)), dilation=_pair(d.get("dilation", 1)),
                         groups=int(d.get("groups", 1)), bias=bool(d.get("bias", True)))
    if t in ("batchnorm1d", "batchnorm2d"):
        cls = nn.BatchNorm1d if t == "batchnorm1d" else nn.BatchNorm2d
        return cls(int(d["num_features"]), eps=float(d.get("eps", 1e-5)), momentum=d.get("momentum", 0.1),
                   affine=bool(d.get("affine", True)))
    if t in _SIMPLE:
        return _SIMPLE[t]()
    if t == "leakyrelu":
        return nn.LeakyReLU(float(d.get("negative_slope", 0.01)))
    if t == "flatten":
        return nn.Flatten(int(d.get("start_dim", 1)), int(d.get("end_dim", -1)))
    if t == "float_flatten":
        return FloatFlatten(int(d.get("start_dim", 1)), int(d.get("end_dim", -1)))
    if t == "unflatten":
        return nn.Unflatten(int(d["dim"]), tuple(int(s) for s in d["sizes"]))
    if t == "dropout":
        return nn.Dropout(float(d.get("p", 0.5)))
    if t in ("maxpool2d", "avgpool2d"):
        cls = nn.MaxPool2d if t == "maxpool2d" else nn.AvgPool2d
        return cls(_pair(d["kernel_size"]), stride=_pair(d.get("stride")), padding=_pair(d.get("padding", 0)))
    if t == "adaptiveavgpool2d":
        return nn.AdaptiveAvgPool2d(_pair(d["output_size"]))
    raise Unsupported(f"unknown layer type {t!r} in a sequential architecture")


# ---- input reduction -----------------------------------------------------------------------------


class ReducedInput(nn.Module):
    """A student behind a fixed (non-trainable) first layer: flatten -> Linear(in, k) -> student.

    The Linear holds a PCA projection (centering folded into its bias) or a 0/1 selection matrix
    (select_k_best), so the model takes the ORIGINAL features while the student sees k.
    """

    def __init__(self, in_features: int, components: int, student: nn.Module):
        super().__init__()
        self.flatten = FloatFlatten()
        self.reduce = nn.Linear(in_features, components)
        self.reduce.requires_grad_(False)
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(self.reduce(self.flatten(x)))


def build_input_reduction(architecture: Mapping[str, Any]) -> ReducedInput:
    """``{"family": "input_reduction", "in_features", "components", "student": {...}}``."""
    return ReducedInput(int(architecture["in_features"]), int(architecture["components"]),
                        from_architecture(architecture["student"]))


# ---- rebuild -------------------------------------------------------------------------------------

#: The families an architecture dict may name, and how each is rebuilt.
BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "embedding_bag": build_embedding_bag,
    "text_transformer": build_text_transformer,
    "sequential": build_sequential,
    "input_reduction": build_input_reduction,
}


def from_architecture(architecture: Mapping[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from its architecture dict (defaults fill optional keys)."""
    family = architecture.get("family") if isinstance(architecture, Mapping) else None
    if family not in BUILDERS:
        raise Unsupported(f"cannot rebuild model family {family!r}; known: {', '.join(BUILDERS)}")
    try:
        return BUILDERS[family](architecture)
    except KeyError as exc:
        raise InvalidModel(f"{family} architecture is missing the key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise InvalidModel(f"{family} architecture is invalid: {exc}") from None


