"""Held-out evaluation: predictions and task metrics.

* :func:`predict`: model + inputs -> outputs [N, D], batched, eval mode
* :func:`classification_metrics`: ``agreement`` (argmax equality with the teacher) and, with
  labels, ``accuracy`` and ``f1_macro``
* :func:`regression_metrics`: with labels ``mse``, ``mae``, ``r2``; against the teacher's
  outputs ``teacher_r2`` and ``agreement_mse``
* :func:`embedding_metrics`: ``cosine`` (mean cosine similarity to the teacher's embeddings), ``mse``
* :func:`task_metrics`: dispatch on the task
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

METRIC_KEYS = ("accuracy", "agreement", "f1_macro", "mse", "mae", "r2", "teacher_r2", "agreement_mse", "cosine")
#: metrics where higher is better (the others: lower is better)
HIGHER_IS_BETTER = {"accuracy", "agreement", "f1_macro", "r2", "teacher_r2", "cosine"}


def predict(model: nn.Module, x: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 1024,
            take: Callable[[int, int], Sequence[torch.Tensor]] | None = None, n: int | None = None) -> torch.Tensor:
    """Outputs of ``model`` in eval mode; restores the previous train/eval mode.

    ``x`` is one tensor or a list of input tensors; or give ``take(start, stop) -> [tensors]`` and ``n``.
    """
    if take is None:
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        n = xs[0].shape[0]

        def take(a: int, b: int) -> list[torch.Tensor]:
            return [t[a:b] for t in xs]

    assert n is not None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(*take(i, min(n, i + batch_size))).float() for i in range(0, n, batch_size)])
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


def _r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination, averaged uniformly over output columns (sklearn's default)."""
    pred, target = pred.double(), target.double()
    ss_res = ((target - pred) ** 2).sum(dim=0)
    ss_tot = ((target - target.mean(dim=0)) ** 2).sum(dim=0)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), torch.zeros_like(ss_tot))
    return float(r2.mean())


def regression_metrics(
    outputs: torch.Tensor, teacher_outputs: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> dict[str, float]:
    out: dict[str, float] = {}
    pred = outputs.double()
    if labels is not None:
        y = labels.to(pred.device).double().reshape(pred.shape[0], -1)
        out["mse"] = float(((pred - y) ** 2).mean())
        out["mae"] = float((pred - y).abs().mean())
        out["r2"] = _r2(pred, y)
    if teacher_outputs is not None:
        t = teacher_outputs.to(pred.device).double()
        out["agreement_mse"] = float(((pred - t) ** 2).mean())
        out["teacher_r2"] = _r2(pred, t)
    return out


def embedding_metrics(outputs: torch.Tensor, teacher_outputs: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    if teacher_outputs is not None:
        s, t = outputs.double(), teacher_outputs.to(outputs.device).double()
        out["cosine"] = float(torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12).mean())
        out["mse"] = float(((s - t) ** 2).mean())
    return out


def task_metrics(task: str, outputs: torch.Tensor, teacher_outputs: torch.Tensor | None,
                 labels: torch.Tensor | None) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(outputs, teacher_outputs, labels)
    if task == "regression":
        return regression_metrics(outputs, teacher_outputs, labels)
    return embedding_metrics(outputs, teacher_outputs, labels)


def teacher_metrics(task: str, teacher_outputs: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """The teacher's own held-out row (it agrees with itself by definition)."""
    if task == "classification":
        return {**classification_metrics(teacher_outputs, None, labels), "agreement": 1.0}
    if task == "regression":
        return {**regression_metrics(teacher_outputs, None, labels), "agreement_mse": 0.0, "teacher_r2": 1.0}
    return {"cosine": 1.0, "mse": 0.0}


def headline_metric(task: str, has_labels: bool) -> str:
    """The metric ``early_stopping.metric: auto`` watches."""
    if task == "classification":
        return "accuracy" if has_labels else "agreement"
    if task == "regression":
        return "mse" if has_labels else "agreement_mse"
    return "cosine"
