"""Student model families (registry ``students``, selected by ``student.family``).

A family instance turns its config plus the data/teacher dimensions into a
fresh model: ``family.create(input_shape, out_features) -> (nn.Module, architecture)``.

* ``input_shape``: per-row input shape, e.g. ``(64,)`` or ``(8, 8)``
* the model maps float32 [B, *input_shape] -> logits [B, out_features]
* ``architecture`` is a JSON-able dict that :func:`from_architecture` turns
  back into the same (untrained) module, so weights saved as safetensors can be
  reloaded without the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .registry import check, students
from .types import EngineError

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@students.register("mlp")
class MLPStudent:
    """Flatten -> [Linear -> activation -> (Dropout)] * len(hidden) -> Linear."""

    @dataclass(frozen=True)
    class Config:
        hidden: list[int] = field(default_factory=lambda: [128])
        activation: Literal["relu", "gelu", "tanh"] = "relu"
        dropout: float = 0.0

        def __post_init__(self) -> None:
            check(all(h >= 1 for h in self.hidden), f"hidden sizes must be >= 1, got {self.hidden}")
            check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    def __init__(self, config: Config):
        self.config = config

    def create(self, input_shape: tuple[int, ...], out_features: int) -> tuple[nn.Module, dict[str, Any]]:
        architecture = {
            "family": "mlp",
            "in_features": int(math.prod(input_shape)),
            "input_shape": [int(d) for d in input_shape],
            "hidden": list(self.config.hidden),
            "out_features": int(out_features),
            "activation": self.config.activation,
            "dropout": float(self.config.dropout),
        }
        return build_mlp(architecture), architecture


def build_mlp(architecture: dict[str, Any]) -> nn.Sequential:
    """The ``nn.Sequential`` an mlp architecture dict describes (fresh weights).

    Layer indices are part of the safetensors key names ("1.weight", ...), so
    the layout must only ever change together with a format version bump.
    """
    act = _ACTIVATIONS[architecture["activation"]]
    dropout = float(architecture.get("dropout", 0.0))
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(architecture["in_features"])
    for h in architecture["hidden"]:
        layers += [nn.Linear(width, int(h)), act()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, int(architecture["out_features"])))
    return nn.Sequential(*layers)


_BUILDERS = {"mlp": build_mlp}


def from_architecture(architecture: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) student from its architecture dict."""
    family = architecture.get("family")
    if family not in _BUILDERS:
        raise EngineError("unsupported", f"cannot rebuild student family {family!r}")
    return _BUILDERS[family](architecture)


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def state_dict_bytes(model: nn.Module) -> int:
    """Raw tensor bytes of the state dict (fallback size when nothing is exported)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)))
