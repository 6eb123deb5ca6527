"""What every student family shares: reading the data's inputs, the teacher's vocabulary, parameter counts.

``normalize_inputs(inputs) -> list[InputInfo]``; ``_token_inputs`` / ``_single_float_input`` /
``_image_shape`` check that a family fits the data's inputs (``ShapeMismatch`` naming the family).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from engine.values import InputInfo
from engine.errors import ShapeMismatch, Unsupported

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
Init = Literal["random", "teacher"]


# ---- helpers -------------------------------------------------------------------------------------


def normalize_inputs(inputs: Any) -> list[InputInfo]:
    """The data's inputs as a non-empty ``list[InputInfo]``."""
    out = list(inputs)
    if not out:
        raise ShapeMismatch("the student needs at least one input")
    return out


def _single_float_input(inputs: list[InputInfo], family: str) -> InputInfo:
    if len(inputs) != 1:
        raise Unsupported(f"student family {family!r} takes exactly one input, the data has {len(inputs)} "
            f"({', '.join(i.name for i in inputs)}); use embedding_bag or text_transformer for token ids + mask",
        )
    return inputs[0]


def _image_shape(shape: tuple[int, ...] | list[int], family: str) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    raise ShapeMismatch(
        f"student family {family!r} needs image rows of shape C×H×W or H×W, the data has rows of shape {list(shape)}",
    )


def _token_inputs(inputs: list[InputInfo], family: str) -> tuple[InputInfo, InputInfo | None]:
    if not 1 <= len(inputs) <= 2:
        raise Unsupported(f"student family {family!r} takes input_ids and optionally attention_mask")
    ids = inputs[0]
    if not ids.is_integer or len(ids.row_shape) != 1:
        raise ShapeMismatch(f"student family {family!r} needs token ids (integer rows of shape [L]) as its first input; "
            f"{ids.name!r} has {'integer' if ids.is_integer else 'float'} rows of shape {list(ids.row_shape)}",
        )
    mask = inputs[1] if len(inputs) == 2 else None
    if mask is not None and tuple(mask.row_shape) != tuple(ids.row_shape):
        raise ShapeMismatch(f"{mask.name!r} must have the shape of {ids.name!r}")
    return ids, mask


def _type_name(module: nn.Module) -> str:
    """The Python class name, also for TorchScript modules (``original_name``)."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def state_dict_bytes(model: nn.Module) -> int:
    """Raw tensor bytes of the state dict (fallback size when nothing is exported)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)))
