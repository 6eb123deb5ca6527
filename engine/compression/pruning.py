"""Weight pruning: unstructured (magnitude / random / layer-wise) and structured channel pruning.

Entry points (the pipeline handles fine-tuning between iterations)::

    result = prune(model, {"method": "magnitude", "amount": 0.8, "scope": "global"},
                   example_inputs=(x[:2],))                 # all iterations at once
    for result in prune_steps(model, config, example_inputs=(x[:2],)):
        finetune(result.model)                              # between iterations, in place
    prune_step(model, config, k, of, example_inputs=...)    # iteration k of `of`, in place

Config (registry ``pruners``, discriminator ``method``): the spec's :class:`jobspec.PruneStep`, or the same
fields as a dict, validated by it::

    {"method": "magnitude" | "random" | "layer" | "channel",
     "amount": 0 < float < 1,          # final fraction of weights (channels for "channel") removed
     "scope": "global" | "layer",      # magnitude only
     "iterations": int >= 1,           # pruning rounds; cumulative schedule below
     "finetune": {...}}                # accepted and ignored here (the pipeline's business)

Iterative schedule (:func:`schedule_amounts`): round ``k`` of ``n`` reaches the
cumulative amount ``1 - (1 - amount) ** (k / n)``, i.e. every round removes the
same fraction of what is left. Unstructured rounds re-rank all weights (already
zeroed weights rank lowest, so they stay pruned); the channel method converts the
cumulative target into the per-round ratio of the current width.

Pruned weights are real zeros: masks are applied with ``torch.nn.utils.prune``
and made permanent with ``prune.remove`` (no ``weight_orig`` / ``weight_mask``
left), so the model scripts, traces and exports like the original.

Prunable weights are the ``weight`` of every ``nn.Linear``, ``nn.Conv1d`` and
``nn.Conv2d``. TorchScript and torch.export models are first rebuilt with
:func:`editable.to_editable`; eager models are deep-copied (the input is never
modified by :func:`prune`/:func:`prune_steps`).

References: ``magnitude`` — S. Han, J. Pool, J. Tran, W. J. Dally, "Learning both Weights and Connections
for Efficient Neural Networks", NeurIPS 2015; the iterative schedule — M. Zhu, S. Gupta, "To prune, or not
to prune: exploring the efficacy of pruning for model compression", ICLR Workshop 2018; ``layer``
(sensitivity-driven per-layer sparsity) — in the spirit of H. Li, A. Kadav, I. Durdanovic, H. Samet,
H. P. Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017 (per-layer sensitivity analysis);
``channel`` — Li et al. 2017 (L-norm filter ranking) with the dependency graphs of G. Fang, X. Ma, M. Song,
M. B. Mi, X. Wang, "DepGraph: Towards Any Structural Pruning", CVPR 2023 (the ``torch-pruning`` library).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import prune as torch_prune

import jobspec
import jobspec.base
from engine.registry import Registry
from engine.errors import InvalidSpec, Unsupported

pruners: Registry[Any] = Registry("pruner", key="method")

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class PruneResult:
    """``model``: the pruned eager module (masks removed). ``stats``: see :func:`model_stats`."""

    model: nn.Module
    stats: dict[str, float | int]
    config: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------- helpers


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total parameters, non-zero parameters)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all Linear/Conv weights."""
    total = zeros = 0
    for _, m in prunable_layers(model):
        total += m.weight.numel()
        zeros += m.weight.numel() - int(torch.count_nonzero(m.weight.detach()))
    return zeros / total if total else 0.0


def _stats(before: tuple[int, int], model: nn.Module) -> dict[str, float | int]:
    after = count_parameters(model)
    return {
        "parameters_before": before[0],
        "parameters_after": after[0],
        "nonzero_before": before[1],
        "nonzero_after": after[1],
        # zero fraction over the prunable (Linear/Conv) weights
        "sparsity": round(weight_sparsity(model), 6),
        "parameter_ratio": round(after[0] / before[0], 6) if before[0] else 1.0,
        "nonzero_ratio": round(after[1] / before[1], 6) if before[1] else 1.0,
    }


def schedule_amounts(amount: float, iterations: int) -> list[float]:
    """Cumulative amounts after each of ``iterations`` rounds: ``1 - (1 - amount) ** (k / n)``."""
    if not 0 < amount < 1:
        raise ValueError("amount must be in (0, 1)")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    out = [1 - (1 - amount) ** (k / iterations) for k in range(1, iterations + 1)]
    out[-1] = amount
    return out


def _editable(model: Any, example_inputs: tuple[torch.Tensor, ...] | None) -> nn.Module:
    if isinstance(model, (torch.jit.ScriptModule, torch.export.ExportedProgram, torch.fx.GraphModule)):
        from engine.compression.editable import to_editable

        return to_editable(model, example_inputs)
    if not isinstance(model, nn.Module):
        raise Unsupported(f"cannot prune a {type(model).__name__}")
    return copy.deepcopy(model)


def _apply_masks(layers: list[tuple[str, nn.Module]], masks: list[torch.Tensor]) -> None:
    for (_, m), mask in zip(layers, masks):
        torch_prune.custom_from_mask(m, "weight", mask)
        torch_prune.remove(m, "weight")


def _magnitude_masks(layers: list[tuple[str, nn.Module]], amounts: list[float]) -> list[torch.Tensor]:
    masks = []
    for (_, m), a in zip(layers, amounts):
        w = m.weight.detach().abs()
        k = int(round(a * w.numel()))
        mask = torch.ones_like(w)
        if k > 0:
            idx = torch.topk(w.flatten(), k, largest=False).indices
            mask.view(-1)[idx] = 0
        masks.append(mask)
    return masks


# ----------------------------------------------------------------------- plugins


class _Pruner:
    """A pruning method; ``config`` is the spec's :class:`jobspec.PruneStep` (method, amount, scope,
    iterations; its ``finetune`` is run by the job pipeline, not here)."""

    Config = jobspec.PruneStep

    def __init__(self, config: jobspec.PruneStep):
        self.config = config


@pruners.register("magnitude")
class MagnitudePruner(_Pruner):
    """L1 unstructured. ``scope: global`` = one threshold over all Linear/Conv weights
    (``torch.nn.utils.prune.global_unstructured``); ``layer`` = ``amount`` in every layer."""

    def apply(self, model: nn.Module, cumulative: float, previous: float, **_: Any) -> None:
        layers = prunable_layers(model)
        if self.config.scope == "global":
            torch_prune.global_unstructured(
                [(m, "weight") for _, m in layers], pruning_method=torch_prune.L1Unstructured, amount=cumulative
            )
            for _, m in layers:
                torch_prune.remove(m, "weight")
        else:
            for _, m in layers:
                torch_prune.l1_unstructured(m, "weight", amount=cumulative)
                torch_prune.remove(m, "weight")


@pruners.register("random")
class RandomPruner(_Pruner):
    """Random unstructured, ``amount`` per layer, drawn from torch's global RNG
    (seed it with ``torch.manual_seed``). Later rounds only pick among surviving weights."""

    def apply(self, model: nn.Module, cumulative: float, previous: float, **_: Any) -> None:
        for _, m in prunable_layers(model):
            w = m.weight.detach()
            alive = (w != 0).flatten()
            target = int(round(cumulative * w.numel()))
            extra = max(0, target - int((~alive).sum()))
            mask = alive.clone().float()
            if extra:
                candidates = alive.nonzero().flatten()
                pick = candidates[torch.randperm(candidates.numel())[:extra]]
                mask[pick] = 0
            torch_prune.custom_from_mask(m, "weight", mask.view_as(w))
            torch_prune.remove(m, "weight")


@pruners.register("layer")
class LayerPruner(_Pruner):
    """Layer-wise amounts from layer importance, then L1 magnitude inside each layer.

    Rule: each prunable layer ``l`` gets an importance score ``s_l`` --
    with ``importance_data``: its sensitivity, the relative change of the model's
    output (mean |dy| / mean |y|) when that layer alone is magnitude-pruned to
    ``amount``; without data: its size-normalised L1 norm ``mean|W_l| * sqrt(fan_in_l)``.
    The fraction of weights a layer KEEPS is proportional to its score,
    ``keep_l = clip(c * s_l / max(s), 0.02, 1)``, with ``c`` found by bisection so
    that the overall (parameter-weighted) sparsity over all layers equals ``amount``.
    Less important layers therefore get higher sparsity, the mean is exact.
    """

    def __init__(self, config: jobspec.PruneStep):
        super().__init__(config)
        self.layer_amounts: dict[str, float] = {}

    def scores(self, model: nn.Module, amount: float, importance_data: tuple[torch.Tensor, ...] | None) -> list[float]:
        layers = prunable_layers(model)
        if importance_data is None:
            out = []
            for _, m in layers:
                w = m.weight.detach()
                fan_in = w[0].numel()
                out.append(float(w.abs().mean()) * math.sqrt(fan_in))
            return out
        inputs = tuple(t[:512] for t in importance_data)
        was = model.training
        model.eval()
        out = []
        with torch.no_grad():
            y = model(*inputs)
            scale = float(y.abs().mean()) or 1.0
            for (_, m), mask in zip(layers, _magnitude_masks(layers, [amount] * len(layers))):
                saved = m.weight.detach().clone()
                m.weight.mul_(mask)
                out.append(float((model(*inputs) - y).abs().mean()) / scale)
                m.weight.copy_(saved)
        model.train(was)
        return out

    @staticmethod
    def allocate(scores: list[float], sizes: list[int], amount: float, floor: float = 0.02) -> list[float]:
        """Per-layer amounts with keep ∝ score and size-weighted mean amount == ``amount``."""
        top = max(scores) or 1.0
        rel = [max(s / top, 1e-6) for s in scores]
        total = sum(sizes)
        target_keep = (1 - amount) * total

        def kept(c: float) -> float:
            return sum(n * min(1.0, max(floor, c * r)) for n, r in zip(sizes, rel))

        lo, hi = 0.0, 1.0 / min(rel)
        for _ in range(100):
            mid = (lo + hi) / 2
            if kept(mid) < target_keep:
                lo = mid
            else:
                hi = mid
        return [1 - min(1.0, max(floor, hi * r)) for r in rel]

    def apply(self, model: nn.Module, cumulative: float, previous: float, importance_data=None, **_: Any) -> None:
        layers = prunable_layers(model)
        scores = self.scores(model, cumulative, importance_data)
        amounts = self.allocate(scores, [m.weight.numel() for _, m in layers], cumulative)
        self.layer_amounts = {n: round(a, 4) for (n, _), a in zip(layers, amounts)}
        _apply_masks(layers, _magnitude_masks(layers, amounts))


@pruners.register("channel")
class ChannelPruner(_Pruner):
    """Structured: removes whole neurons / conv output channels (and the matching
    inputs of the next layer, BatchNorm entries, flattened features) with
    torch-pruning's ``MetaPruner`` + ``MagnitudeImportance`` (group L``p`` norm).
    The last Linear/Conv (the classifier) keeps its outputs. ``amount`` is the
    fraction of channels removed from every other prunable layer, so an MLP's
    hidden-to-hidden weights shrink to about ``(1 - amount)**2``."""

    #: Group L2 norm of a channel's weights as its importance.
    norm = 2

    def apply(self, model: nn.Module, cumulative: float, previous: float, example_inputs=None, **_: Any) -> None:
        import torch_pruning as tp

        if example_inputs is None:
            raise InvalidSpec("channel pruning needs example_inputs")
        layers = prunable_layers(model)
        if not layers:
            return
        # Per-layer target widths from the (estimated) original width, so that rounding does not
        # compound over rounds: original ~= current / (1 - previous), target = round(original * (1 - cumulative)).
        ratios = {}
        for _, m in layers[:-1]:
            current = m.weight.shape[0]
            target = max(1, round(current / (1 - previous) * (1 - cumulative)))
            if target < current:
                # torch-pruning keeps int(current * (1 - ratio)) channels
                ratios[m] = 1 - (target + 0.5) / current
        if not ratios:
            return
        was = model.training
        model.eval()
        with torch.enable_grad():  # torch-pruning traces the graph through autograd
            pruner = tp.pruner.MetaPruner(
                model,
                tuple(example_inputs) if len(example_inputs) > 1 else example_inputs[0],
                importance=tp.importance.MagnitudeImportance(p=self.norm),
                pruning_ratio=0.0,
                pruning_ratio_dict=ratios,
                ignored_layers=[layers[-1][1]] + [m for _, m in layers[:-1] if m not in ratios],
            )
            pruner.step()
        model.train(was)
        # torch-pruning edits modules in place; keep their hyperparameters consistent for scripting
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]


# ------------------------------------------------------------------------- API


def build(config: Mapping[str, Any] | jobspec.PruneStep) -> Any:
    """The pruner for ``config``: the spec's prune step, or the same fields as a dict (``{"method":
    "channel", "amount": 0.5}``), validated by :class:`jobspec.PruneStep`."""
    if not isinstance(config, jobspec.PruneStep):
        try:
            config = jobspec.PruneStep.model_validate(dict(config))
        except ValidationError as exc:
            raise InvalidSpec(f"prune: {jobspec.base.validation_message(exc)}") from None
    return pruners.get(config.method)(config)


def prune_step(
    model: nn.Module,
    config: dict[str, Any] | Any,
    k: int,
    of: int,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    importance_data: tuple[torch.Tensor, ...] | None = None,
) -> PruneResult:
    """Round ``k`` (1-based) of ``of`` on an eager ``model``, IN PLACE (after rounds 1..k-1).

    ``config``: the config dict or an already built pruner.
    """
    pruner = build(config) if isinstance(config, dict) else config
    amount = pruner.config.amount
    amounts = schedule_amounts(amount, of)
    if not 1 <= k <= of:
        raise ValueError(f"k must be in 1..{of}")
    before = count_parameters(model)
    previous = amounts[k - 2] if k > 1 else 0.0
    with torch.no_grad():
        pruner.apply(model, amounts[k - 1], previous, example_inputs=example_inputs, importance_data=importance_data)
    stats = _stats(before, model)
    extra = getattr(pruner, "layer_amounts", None)
    if extra:
        stats["layer_amounts"] = dict(extra)  # type: ignore[assignment]
    return PruneResult(model, stats, dict(config) if isinstance(config, dict) else {})


def prune_steps(
    model: Any,
    config: dict[str, Any],
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    importance_data: tuple[torch.Tensor, ...] | None = None,
) -> Iterator[PruneResult]:
    """Yields after each of ``config["iterations"]`` rounds; the caller may fine-tune
    ``result.model`` in place before asking for the next round. Stats are relative to
    the original model. The input model is not modified."""
    pruner = build(config)
    work = _editable(model, example_inputs)
    before = count_parameters(work)
    n = pruner.config.iterations
    for k in range(1, n + 1):
        result = prune_step(work, pruner, k, n, example_inputs=example_inputs, importance_data=importance_data)
        stats = _stats(before, work)
        if "layer_amounts" in result.stats:
            stats["layer_amounts"] = result.stats["layer_amounts"]
        stats["iteration"] = k
        stats["iterations"] = n
        yield PruneResult(work, stats, dict(config))


def prune(
    model: Any,
    config: dict[str, Any],
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    importance_data: tuple[torch.Tensor, ...] | None = None,
) -> PruneResult:
    """All rounds, without fine-tuning in between; returns the last round's result."""
    rounds = list(prune_steps(model, config, example_inputs=example_inputs, importance_data=importance_data))
    return rounds[-1]


# ------------------------------------------------------------ keeping sparsity


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: bool mask of non-zero weights}`` for every Linear/Conv; pass to
    :func:`reapply_masks` after each optimizer step so fine-tuning keeps pruned weights at 0."""
    return {n: m.weight.detach() != 0 for n, m in prunable_layers(model)}


def reapply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)
