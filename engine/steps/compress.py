"""What the compression steps (``prune``, ``quantize``) share.

* :class:`OrtModule`: an ONNX model (file) behind the ``nn.Module`` call interface, CPU only.
* :func:`parameter_counts`: a model in, ``(parameters, non-zero parameters)`` out, quantized and ONNX
  models included.
* :func:`example_inputs`, :func:`calibration_batches`, :func:`record_data`: rows of the job's data for
  tracing and calibration, and what was used, noted in the step's report row.

The steps themselves are :mod:`engine.steps.prune` and :mod:`engine.steps.quantize`; each works on
the job's :class:`~engine.training.context.TrainContext` and may REPLACE ``ctx.student`` /
``ctx.architecture``, leaving a :class:`~engine.training.context.StepOutput` in
``ctx.step_outputs[index]``. Fine-tuning (prune ``finetune``, ``qat``) is the shared
:func:`~engine.training.loop.fit` loop distilling from the job's ORIGINAL teacher on the job's dataset.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime behind the ``nn.Module`` call interface (CPU, inference only).

    ``feed_names``: the session's input names in the data's input order.
    """

    CPU_ONLY = True  # engine.devices.is_cpu_only

    def __init__(self, path: Path, feed_names: list[str] | None = None, threads: int | None = None):
        super().__init__()
        from engine.export.formats import ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads or torch.get_num_threads())
        names = [i.name for i in self.session.get_inputs()]
        self.feed_names = list(feed_names) if feed_names else names
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(self.feed_names, xs)}
        return torch.from_numpy(np.asarray(self.session.run([self.output_name], feeds)[0], dtype=np.float32))

    def counts(self) -> tuple[int, int]:
        """(weights, non-zero weights): initializers with more than one element (scales and zero
        points are not counted)."""
        import onnx
        from onnx import numpy_helper

        total = nonzero = 0
        for init in onnx.load(str(self.path), load_external_data=False).graph.initializer:
            n = int(math.prod(init.dims))
            if n <= 1:
                continue
            total += n
            nonzero += int(np.count_nonzero(numpy_helper.to_array(init)))
        return total, nonzero


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), including the packed weights of quantized modules
    (counted from their int8 values) and ONNX initializers for :class:`OrtModule`."""
    if isinstance(model, OrtModule):
        return model.counts()
    total = nonzero = 0
    for m in model.modules():
        for name in ("weight", "bias"):
            attr = getattr(type(m), name, None)
            if attr is None or not callable(getattr(m, name, None)) or isinstance(getattr(m, name), torch.Tensor):
                continue
            try:
                t = getattr(m, name)()
            except Exception:  # noqa: BLE001 - not a quantized module's accessor
                continue
            if not isinstance(t, torch.Tensor):
                continue
            values = t.int_repr() if t.is_quantized else t
            total += t.numel()
            nonzero += int(torch.count_nonzero(values))
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return int(total), int(nonzero)


# ---------------------------------------------------------------------------------------------
# data helpers


def example_inputs(ctx: Any, rows: int = 2) -> list[torch.Tensor]:
    """The first ``rows`` held-out rows, one tensor per input ``[rows, *row_shape]`` (for tracing)."""
    return list(ctx.val.slice(0, min(rows, ctx.val.n)))


def record_data(ctx: Any, index: int, info: dict[str, Any]) -> None:
    """Merge ``info`` (which rows a step used) into ``ctx.step_info[index]``."""
    ctx.step_info.setdefault(index, {}).update(info)


def calibration_batches(ctx: Any, step: Any, index: int, rows: int,
                        batch: int = 32) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """``rows`` seeded random rows of the job's training data, as CPU batches of ``batch``."""
    data = ctx.step_data(step, index, [])
    n = data.table.n
    k = max(1, min(rows, n))
    g = torch.Generator().manual_seed(ctx.seed + 31 * (index + 1))
    idx = torch.sort(torch.randperm(n, generator=g)[:k]).values
    xs = [t.detach().cpu() for t in data.table.take(idx)]
    record_data(ctx, index, {**data.info, "calibration_rows": int(k)})
    return [tuple(x[i:i + batch] for x in xs) for i in range(0, k, batch)], int(k)
