"""Held-out evaluation: predictions and classification metrics.

* :func:`predict`: model + inputs [N, ...] -> logits [N, C], batched, eval mode
* :func:`classification_metrics`: logits (+ teacher logits, + labels) -> dict
  with ``agreement`` (argmax equality with the teacher) and, when labels are
  known, ``accuracy`` and ``f1_macro``.
"""

from __future__ import annotations

import torch
from torch import nn


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode; restores the previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was_training)


def f1_macro(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 over classes seen in ``target`` or ``pred``.

    Same convention as ``sklearn.metrics.f1_score(average="macro")``.
    """
    pred, target = pred.long().cpu(), target.long().cpu()
    n = int(max(pred.max(), target.max())) + 1
    tp = torch.bincount(target[pred == target], minlength=n).double()
    pred_count = torch.bincount(pred, minlength=n).double()
    true_count = torch.bincount(target, minlength=n).double()
    present = (pred_count + true_count) > 0
    f1 = 2 * tp[present] / (pred_count[present] + true_count[present])
    return float(f1.mean())


def classification_metrics(
    logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> dict[str, float]:
    pred = logits.argmax(dim=1)
    out: dict[str, float] = {}
    if labels is not None:
        labels = labels.to(pred.device)
        out["accuracy"] = float((pred == labels).double().mean())
        out["f1_macro"] = f1_macro(pred, labels)
    if teacher_logits is not None:
        out["agreement"] = float((pred == teacher_logits.to(pred.device).argmax(dim=1)).double().mean())
    return out
