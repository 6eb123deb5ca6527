"""The ``prune`` step's driver: prune the student in rounds (:mod:`engine.compression.pruning`),
evaluating after each and fine-tuning when the step has ``finetune``.

``run_prune(ctx, step, index)`` replaces ``ctx.student`` by the pruned model (and, for ``channel``
pruning, ``ctx.architecture`` by its new shape) and leaves the rounds' metrics and the sparsity stats in
``step_output(ctx, index).details["prune"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.devices import is_cpu_only
from engine.errors import EngineError, InvalidSpec
from engine.steps.compress import example_inputs, record_data
from engine.training.context import step_output


def run_prune(ctx: Any, step: Any, index: int) -> None:
    """Prune ``ctx.student`` as ``step.pruner_config()`` says; see the module docstring."""
    from engine.compression import pruning
    from engine.training.loop import fit

    model = ctx.student
    if is_cpu_only(model):
        raise InvalidSpec(f"steps[{index}]: a quantized model cannot be pruned")
    cfg = step.pruner_config()
    method = cfg["method"]
    example = tuple(example_inputs(ctx))
    importance = None
    if method == "layer":
        data = ctx.step_data(step, index, [])
        importance = tuple(data.table.slice(0, min(512, data.table.n)))
        record_data(ctx, index, data.info)
    # random pruning draws from torch's global RNG: seed it from the job
    torch.manual_seed(ctx.seed + 7919 * (index + 1))
    ft = step.finetune
    rounds: list[dict[str, Any]] = []
    result = None
    was_training = model.training
    model.eval()
    try:
        for result in pruning.prune_steps(model, cfg, example_inputs=example, importance_data=importance):
            work = result.model.to(ctx.device)
            for p in work.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
            if isinstance(getattr(ctx.student, "reduce", None), nn.Linear) and hasattr(work, "reduce"):
                work.reduce.requires_grad_(False)  # the folded input reduction stays fixed
            ctx.student = work
            k = int(result.stats["iteration"])
            entry: dict[str, Any] = {"iteration": k, "sparsity": result.stats["sparsity"],
                                     "parameter_ratio": result.stats["parameter_ratio"]}
            pruned_metrics = ctx.evaluate()
            entry["after_pruning"] = pruned_metrics
            ctx.reporter.event("prune", f"step {index}: {method} round {k}/{cfg['iterations']}: sparsity "
                               f"{result.stats['sparsity']:.3f}, parameters x{result.stats['parameter_ratio']:.3f}",
                               data={"step": index, **entry})
            if ft is not None:
                masks = pruning.zero_masks(work) if method != "channel" else None
                fit(ctx, ft, index, after_step=(lambda m, _masks=masks: pruning.reapply_masks(m, _masks)) if masks else None,
                    epoch_offset=(k - 1) * ft.config.epochs, total_epochs=step.epochs)
                entry["after_finetune"] = ctx.evaluate()
            rounds.append(entry)
    finally:
        model.train(was_training)
    assert result is not None
    work = ctx.student
    work.eval()
    if method == "channel":
        ctx.architecture = _architecture_of(work, ctx.architecture)
    stats = {k: v for k, v in pruning._stats((result.stats["parameters_before"], result.stats["nonzero_before"]), work).items()}
    if "layer_amounts" in result.stats:
        stats["layer_amounts"] = result.stats["layer_amounts"]
    details = {"method": method, "amount": cfg["amount"], "iterations": cfg["iterations"], **stats, "rounds": rounds}
    if method == "magnitude":
        details["scope"] = cfg["scope"]
    if ft is not None:
        details["finetune"] = ft.describe()
    step_output(ctx, index).details["prune"] = details


def _architecture_of(model: nn.Module, previous: dict[str, Any]) -> dict[str, Any]:
    """The architecture dict of a structurally pruned model: a plain ``sequential`` chain when it is
    one, else marked so safetensors exports fall back to the module itself."""
    from engine.students import derive

    if isinstance(model, nn.Sequential):
        try:
            arch = derive.chain_architecture(model)
            if previous.get("input_shape"):
                arch["input_shape"] = previous["input_shape"]
            arch["pruned_from"] = previous.get("family")
            return arch
        except EngineError:
            pass
    return {"family": "pruned", "pruned_from": previous.get("family")}
