"""Input reduction for distill steps: fit PCA or ``select_k_best`` (ANOVA F scores) on the step's
transfer set and fold it into the student as a fixed first linear layer.

``apply_input_reduction(ctx, step, index)`` takes one float input [N, D] and REPLACES ``ctx.student`` by
``ReducedInput(D, k, fresh student of the job's family for k inputs)``, ``ctx.architecture`` by its
description; what was fitted goes to ``step_output(ctx, index).details["input_reduction"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.values import InputInfo
from engine.errors import InvalidSpec
from engine.training.context import step_output


def f_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One-way ANOVA F statistic of every column of ``x`` [N, D] against class labels ``y`` [N]: [D]
    (inf where a column separates the classes exactly, 0 where it is constant)."""
    classes = np.unique(y)
    n, k = x.shape[0], len(classes)
    if k < 2:
        return np.zeros(x.shape[1])
    mean = x.mean(0)
    between = np.zeros(x.shape[1])
    within = np.zeros(x.shape[1])
    for c in classes:
        xc = x[y == c]
        mc = xc.mean(0)
        between += len(xc) * (mc - mean) ** 2
        within += ((xc - mc) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (between / (k - 1)) / (within / max(1, n - k))
    f = np.where(np.isfinite(f), f, np.where(between > 0, np.inf, 0.0))
    return f


def apply_input_reduction(ctx: Any, step: Any, index: int) -> None:
    """Fit PCA / select_k_best on the step's transfer set and REPLACE the student by a fresh one of the
    job's family built for ``k`` inputs, behind a fixed first layer taking the original features."""
    from engine.students.architecture import ReducedInput

    cfg = step.input_reduction
    if ctx.make_student is None:
        raise InvalidSpec(f"steps[{index}].input_reduction needs a student family")
    data = ctx.step_data(step, index, list(dict.fromkeys(h.teacher for h in step.hints)))
    table = data.table
    if len(table.names) != 1 or table.float_inputs() != [0]:
        raise InvalidSpec(f"steps[{index}].input_reduction works on one float (tabular/vector) input; "
                          f"the data has inputs {table.names}")
    name = table.names[0]
    x = np.asarray(table.arrays[name][:], dtype=np.float64).reshape(table.n, -1)
    d = x.shape[1]
    k = cfg.components
    if k > d:
        raise InvalidSpec(f"steps[{index}].input_reduction.components: {k} is more than the "
                          f"{d} input features")
    weight = np.zeros((k, d))
    bias = np.zeros(k)
    details: dict[str, Any] = {"method": cfg.method, "components": k, "in_features": d, "fitted_on_rows": table.n}
    if cfg.method == "pca":
        mean = x.mean(0)
        xt = torch.from_numpy(x - mean)
        _, s, vh = torch.linalg.svd(xt, full_matrices=False)
        comps = vh[:k].numpy()
        weight = comps
        bias = -comps @ mean
        var = (s.numpy() ** 2)
        details["explained_variance_ratio"] = round(float(var[:k].sum() / var.sum()), 6) if var.sum() > 0 else 0.0
    else:
        if data.labels is not None and ctx.task == "classification":
            y = data.labels.cpu().numpy()
            details["scored_against"] = "labels"
        elif data.cache is not None and ctx.task == "classification":
            y = data.cache.all_outputs().argmax(1).cpu().numpy()
            details["scored_against"] = "teacher_argmax"
        else:
            raise InvalidSpec(f"steps[{index}].input_reduction select_k_best needs class labels or a "
                              "classification teacher")
        scores = f_scores(x, y)
        chosen = np.sort(np.argsort(-scores, kind="stable")[:k])
        weight[np.arange(k), chosen] = 1.0
        details["selected"] = [int(i) for i in chosen]
    row_shape = tuple(int(s) for s in np.asarray(table.arrays[name][:1]).shape[1:])
    inner, inner_arch = ctx.make_student([InputInfo(name, (k,), False, None)])
    model = ReducedInput(d, k, inner)
    with torch.no_grad():
        model.reduce.weight.copy_(torch.from_numpy(weight).float())
        model.reduce.bias.copy_(torch.from_numpy(bias).float())
    ctx.student = model.to(ctx.device)
    ctx.architecture = {"family": "input_reduction", "method": cfg.method, "in_features": d,
                        "input_shape": list(row_shape), "components": k, "student": inner_arch}
    ctx.reporter.event("input_reduction", f"step {index}: {cfg.method} {d} -> {k} features, folded into the "
                       "student as a fixed first layer", data={"step": index, **{k2: v for k2, v in details.items()
                                                                                    if k2 != "selected"}})
    step_output(ctx, index).details["input_reduction"] = details
