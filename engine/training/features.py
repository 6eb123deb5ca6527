"""Hint (feature) distillation inside a step: hooks that catch the student's named features, and the
hint losses sized from them.

:class:`StudentFeatures` fills ``got[name]`` with the student's feature tensors [B, ...] on every forward;
:func:`build_hint_losses` returns one :class:`~engine.losses.hints.HintLoss` per ``step.hints`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from engine.errors import InvalidSpec


class StudentFeatures:
    """Forward hooks on the student's named submodules (``penultimate`` = input of the last nn.Linear)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        from engine.teachers.torch_modules import last_linear_name

        self.got: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in dict.fromkeys(names):
            if name == "penultimate":
                target = last_linear_name(model)
                if target is None:
                    raise InvalidSpec("hint student 'penultimate' needs a student with an nn.Linear "
                                      "layer; name a module instead (available: "
                                      + ", ".join(n for n in modules if n) + ")")

                def pre(_m: Any, args: Any, _name: str = name) -> None:
                    self.got[_name] = args[0]

                self.handles.append(modules[target].register_forward_pre_hook(pre))
            elif name in modules and name:
                def hook(_m: Any, _a: Any, output: Any, _name: str = name) -> None:
                    self.got[_name] = output[0] if isinstance(output, (tuple, list)) else output

                self.handles.append(modules[name].register_forward_hook(hook))
            else:
                raise InvalidSpec(f"student has no module named {name!r}; available: penultimate, "
                                  + ", ".join(n for n in modules if n))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def build_hint_losses(step: Any, teacher_shapes: Mapping[str, tuple[int, ...]],
                      student_shapes: Mapping[str, tuple[int, ...]], device: torch.device) -> list[nn.Module]:
    """One hint loss (with its adapter) per ``step.hints`` entry, sized by the teacher's and student's
    per-row feature shapes ``{name: shape without the batch dim}``, on ``device``."""
    from engine.losses import hints as hint_losses

    out = []
    for h in step.hints:
        out.append(hint_losses.HintLoss(h.distance, tuple(teacher_shapes[h.teacher]),
                                        tuple(student_shapes[h.student])).to(device))
    return out


def probe_hint_losses(ctx: Any, step: Any, data: Any, student_features: StudentFeatures,
                      teacher_features: Sequence[str]) -> list[nn.Module]:
    """The step's hint losses, sized by one probe batch of (up to) 2 rows of ``data.table``: the teacher's
    features from the cache (or the teacher itself when the step augments), the student's from one
    forward in eval mode (the student's train/eval mode is left as it was)."""
    model = ctx.student
    probe_idx = torch.arange(min(2, data.table.n))
    xs = data.table.take(probe_idx)
    if data.cache is not None:
        _, teacher_got = data.cache.take(probe_idx)
    else:
        teacher_got = ctx.teacher.features(data.table.batch_dict(xs), teacher_features)
    with torch.no_grad():
        was = model.training
        model.eval()
        model(*xs)
        model.train(was)
    return build_hint_losses(step, {k: tuple(v.shape[1:]) for k, v in teacher_got.items()},
                             {k: tuple(v.shape[1:]) for k, v in student_features.got.items()}, ctx.device)
