"""Step kinds (registry ``steps``, selected by ``steps[i].kind``); each ``Config`` is the spec's model.

A step instance exposes what the training loop and the data plan read — ``epochs`` (progress
accounting), ``method`` (shown in the report), ``loss`` / ``optimizer`` (built components), the spec's
sub-configs (``hints``, ``schedule``, ``early_stopping``, ``augment``, ``synthesize``, ``coreset``,
``input_reduction``, ``gate``) — and ``run(ctx, index)``, which changes ``ctx.student`` in place.
Prune and quantize steps read no transfer-data options: theirs are ``None`` by type, not by patching.
"""

from __future__ import annotations

from typing import Any

import jobspec
from engine.registry import losses, optimizers, steps


class _TrainingOptions:
    """The :class:`engine.training.plan.TrainingPlan` of a step: the spec's ``config`` plus the built
    loss and optimizer. Steps that only fine-tune (prune, quantize) train with :class:`Finetune`."""

    config: Any
    hints: tuple[jobspec.Hint, ...] = ()
    augment: jobspec.Augment | None = None
    early_stopping: jobspec.EarlyStopping | None = None
    synthesize: jobspec.Synthesize | None = None
    coreset: jobspec.Coreset | None = None
    input_reduction: jobspec.InputReduction | None = None
    dataset_id: str | None = None

    def __init__(self, loss: jobspec.Config, optimizer: jobspec.OptimizerConfig, schedule: jobspec.ScheduleConfig):
        self.loss = losses.build(loss)
        self.optimizer = optimizers.build(optimizer)
        self.schedule = schedule


@steps.register("distill")
class DistillStep(_TrainingOptions):
    """Train the student to imitate the teacher (loss + optional hints), optionally data-free or on a coreset."""

    Config = jobspec.DistillStep

    def __init__(self, config: jobspec.DistillStep):
        from engine.training.autotune import provisional

        self.auto_config = config  # as the spec says, "auto" values included
        config = provisional(config)
        super().__init__(config.loss, config.optimizer, config.schedule)
        self.config = config
        self.hints = tuple(config.hints)
        self.early_stopping = config.early_stopping
        self.augment = config.augment
        self.synthesize = config.synthesize
        self.coreset = config.coreset
        self.input_reduction = config.input_reduction
        self.dataset_id = config.dataset_id
        self.gate = config.gate

    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def method(self) -> str:
        return self.loss.name

    def run(self, ctx: Any, index: int) -> None:
        from engine.training.loop import fit

        if self.input_reduction is not None:
            from engine.compression.input_reduction import apply_input_reduction

            apply_input_reduction(ctx, self, index)
        evidence = self._resolve_auto(ctx, index)
        fit(ctx, self, index, resumable=True)
        if evidence:
            info = ctx.step_info.setdefault(index, {})
            if "epochs" in evidence:
                stop = info.get("early_stopping", {})
                evidence["epochs"].update({"ran": info.get("epochs_run"), "best_epoch": stop.get("best_epoch")})
            info["auto"] = evidence

    def _resolve_auto(self, ctx: Any, index: int) -> dict[str, Any]:
        """Choose the spec's ``"auto"`` values on this step's data (:mod:`engine.training.autotune`) and rebuild
        the loss and optimizer with them; the evidence for the report (empty when nothing was ``"auto"``)."""
        from engine.training.autotune import has_auto, resolve_auto

        if not has_auto(self.auto_config):
            return {}
        resolved, evidence = resolve_auto(ctx, self, index, self.auto_config)
        self.config = resolved
        self.loss = losses.build(resolved.loss)
        self.optimizer = optimizers.build(resolved.optimizer)
        return evidence


class Finetune(_TrainingOptions):
    """KD from the job's original teacher on the job's dataset (cached teacher outputs) after a compression
    step: no hints, augmentation, coreset or early stopping. ``name`` labels progress ("prune"/"quantize")."""

    def __init__(self, config: jobspec.Finetune, name: str):
        super().__init__(config.loss, config.optimizer, config.schedule)
        self.config = config
        self.name = name

    def describe(self) -> dict:
        c = self.config
        return {"epochs": c.epochs, "loss": c.loss.type, "batch_size": c.batch_size,
                "optimizer": c.optimizer.model_dump(mode="json")}


class _CompressionStep:
    """A step that changes the current model; its transfer-data options do not exist (always ``None``)."""

    synthesize = None
    coreset = None
    augment = None
    input_reduction = None
    dataset_id = None
    hints: tuple[jobspec.Hint, ...] = ()


@steps.register("prune")
class PruneStep(_CompressionStep):
    """Prune the current model (the teacher itself when the job has no student), optionally fine-tuning
    it by KD from the original teacher after every round (``iterations``), pruned weights kept at zero."""

    Config = jobspec.PruneStep

    def __init__(self, config: jobspec.PruneStep):
        self.config = config
        self.finetune = None if config.finetune is None else Finetune(config.finetune, "prune")
        self.gate = config.gate

    @property
    def epochs(self) -> int:
        return self.finetune.config.epochs * self.config.iterations if self.finetune else 0

    @property
    def method(self) -> str:
        return self.config.method

    def pruner_config(self) -> dict:
        c = self.config
        out: dict = {"method": c.method, "amount": c.amount, "iterations": c.iterations}
        if c.method == "magnitude":
            out["scope"] = c.scope
        return out

    def run(self, ctx: Any, index: int) -> None:
        from engine.steps.prune import run_prune

        run_prune(ctx, self, index)


@steps.register("quantize")
class QuantizeStep(_CompressionStep):
    """Lower the precision of the current model: torch int8 (dynamic / static FX / QAT), ONNX Runtime
    int8, or fp16/bf16 weights. Nothing can train the result further."""

    Config = jobspec.QuantizeStep

    def __init__(self, config: jobspec.QuantizeStep):
        self.config = config
        finetune = config.finetune
        if config.method == "qat" and finetune is None:
            finetune = jobspec.Finetune()
        self.finetune = None if finetune is None else Finetune(finetune, "quantize")
        self.gate = config.gate

    @property
    def epochs(self) -> int:
        return self.finetune.config.epochs if (self.finetune and self.config.method == "qat") else 0

    @property
    def method(self) -> str:
        return self.config.method

    def run(self, ctx: Any, index: int) -> None:
        from engine.steps.quantize import run_quantize

        run_quantize(ctx, self, index)
