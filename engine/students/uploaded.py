"""A trainable uploaded student (``student: {"model_id": ...}``) loaded from its file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from torch import nn

from engine.errors import InvalidModel
from engine.students.architecture import BUILDERS


# ---- uploaded students ---------------------------------------------------------------------------


def load_uploaded(source: Any, load_module: Callable[[Path, str, Optional[dict]], nn.Module]
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """An uploaded trainable student (``student: {"model_id": ...}``).

    ``load_module(path, format, architecture)`` does the file I/O (the teacher loader); the module
    comes back in train mode with every floating-point parameter trainable. The architecture is
    ``{"family": "uploaded", "format": ...}``, or for safetensors the uploaded architecture itself
    (so the exported student can be rebuilt by :func:`from_architecture`).
    """
    fmt = str(source.format)
    arch_in = getattr(source, "architecture", None)
    module = load_module(Path(source.path), fmt, dict(arch_in) if arch_in is not None else None)
    if not isinstance(module, nn.Module):
        raise InvalidModel(f"the uploaded {fmt} student is not a trainable PyTorch module")
    module.train()
    trainable = 0
    for p in module.parameters():
        if p.dtype.is_floating_point:
            p.requires_grad_(True)
            trainable += p.numel()
    if trainable == 0:
        raise InvalidModel(f"the uploaded {fmt} student has no trainable floating-point parameters")
    if fmt == "safetensors" and arch_in is not None and arch_in.get("family") in BUILDERS:
        architecture = {**dict(arch_in), "source": "uploaded"}
    else:
        architecture = {"family": "uploaded", "format": fmt}
    return module, architecture


