"""The training loop shared by step kinds, and the state steps work on.

Data lives in :class:`Table` objects: in-memory inputs are tensors on the engine
device and batches are taken by indexing with a per-epoch permutation drawn from
the job's seeded ``torch.Generator`` (no DataLoader); memory-mapped inputs are
gathered per batch (pinned on CUDA). Teacher outputs (and hint features) are
computed once per transfer set and cached (:class:`TeacherCache`, memory-mapped
float16 under ``out_dir/cache`` above :data:`CACHE_MEMORY_LIMIT`) unless the
step augments its inputs: then the teacher runs on the same augmented batch as
the student every step ("consistent teaching").
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data.split import is_lazy
from engine.metrics import HIGHER_IS_BETTER, headline_metric, predict, task_metrics
from engine.training.optim import Scheduler
from engine.values import Reporter
from engine.errors import Cancelled, EngineError

#: Teacher caches larger than this (bytes, float32) go to a float16 memory-mapped file.
CACHE_MEMORY_LIMIT = 1 << 30


def _to_model_array(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    return a.astype(np.float32, copy=False)


class Table:
    """Input rows in model order: tensors on ``device`` (in memory) or lazily gathered (memory-mapped)."""

    def __init__(self, arrays: Mapping[str, Any], device: torch.device):
        self.names = list(arrays)
        self.arrays = dict(arrays)
        self.device = device
        self.lazy = any(is_lazy(a) for a in arrays.values())
        self.n = int(next(iter(arrays.values())).shape[0])
        self.tensors: list[torch.Tensor] | None = None
        if not self.lazy:
            self.tensors = [torch.from_numpy(np.ascontiguousarray(_to_model_array(a))).to(device)
                            for a in arrays.values()]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], device: torch.device) -> Table:
        self = cls.__new__(cls)
        self.names = list(tensors)
        self.device = device
        self.lazy = False
        self.tensors = [t.to(device) for t in tensors.values()]
        self.arrays = {k: t.detach().cpu().numpy() for k, t in tensors.items()}
        self.n = int(self.tensors[0].shape[0])
        return self

    def _gather(self, rows: np.ndarray | slice) -> list[torch.Tensor]:
        out = []
        for a in self.arrays.values():
            t = torch.from_numpy(np.ascontiguousarray(_to_model_array(a[rows])))
            if self.device.type == "cuda":
                t = t.pin_memory().to(self.device, non_blocking=True)
            out.append(t)
        return out

    def take(self, idx: torch.Tensor) -> list[torch.Tensor]:
        if self.tensors is not None:
            return [t[idx.to(t.device)] for t in self.tensors]
        return self._gather(idx.cpu().numpy())

    def slice(self, a: int, b: int) -> list[torch.Tensor]:
        if self.tensors is not None:
            return [t[a:b] for t in self.tensors]
        return self._gather(slice(a, b))

    def subset(self, idx: np.ndarray) -> Table:
        from engine.data.split import take_rows

        return Table(take_rows(self.arrays, idx) if self.lazy else {k: np.asarray(v)[idx] for k, v in self.arrays.items()},
                     self.device)

    def batch_dict(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, tensors))

    def float_inputs(self) -> list[int]:
        return [i for i, a in enumerate(self.arrays.values()) if not np.issubdtype(np.asarray(a[:1]).dtype, np.integer)]


class TeacherCache:
    """Teacher outputs [N, D] (+ hint features) for a table's rows, computed once."""

    def __init__(self, outputs: Any, feats: dict[str, Any], device: torch.device, on_disk: bool):
        self.outputs, self.feats, self.device, self.on_disk = outputs, feats, device, on_disk

    @classmethod
    def build(cls, teacher: Any, table: Table, features: Sequence[str], *, device: torch.device,
              cache_dir: Path | None, should_stop: Callable[[], bool] | None, limit: int | None = None,
              tag: str = "cache") -> TeacherCache:
        from engine.teachers.loading import teacher_outputs

        limit = CACHE_MEMORY_LIMIT if limit is None else limit
        state: dict[str, Any] = {}
        n = table.n

        def on_batch(start: int, out: torch.Tensor, feats: dict[str, torch.Tensor]) -> None:
            if not state:
                row_bytes = 4 * (out[0].numel() + sum(v[0].numel() for v in feats.values()))
                on_disk = cache_dir is not None and n * row_bytes > limit
                state["on_disk"] = on_disk

                def alloc(name: str, row_shape: tuple[int, ...]) -> Any:
                    if on_disk:
                        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
                        safe = "".join(c if c.isalnum() else "_" for c in name)
                        return np.lib.format.open_memmap(Path(cache_dir) / f"{tag}-{safe}.npy", mode="w+",  # type: ignore[arg-type]
                                                         dtype=np.float16, shape=(n, *row_shape))
                    return torch.empty((n, *row_shape), dtype=torch.float32, device=device)

                state["out"] = alloc("outputs", tuple(out.shape[1:]))
                state["feats"] = {k: alloc(f"feat-{k}", tuple(v.shape[1:])) for k, v in feats.items()}
            stop = start + out.shape[0]

            def put(dst: Any, src: torch.Tensor) -> None:
                if isinstance(dst, np.ndarray):
                    dst[start:stop] = src.detach().cpu().numpy().astype(np.float16)
                else:
                    dst[start:stop] = src.to(dst.device, torch.float32)

            put(state["out"], out)
            for k, v in feats.items():
                put(state["feats"][k], v)

        teacher_outputs(teacher, table.arrays, features=list(features), should_stop=should_stop, on_batch=on_batch)
        return cls(state["out"], state["feats"], device, state["on_disk"])

    def _get(self, a: Any, idx: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            rows = idx if isinstance(idx, slice) else idx.cpu().numpy()
            return torch.from_numpy(np.asarray(a[rows], dtype=np.float32)).to(self.device)
        return a[idx.to(a.device) if isinstance(idx, torch.Tensor) else idx]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._get(self.outputs, idx), {k: self._get(v, idx) for k, v in self.feats.items()}

    def all_outputs(self) -> torch.Tensor:
        return self._get(self.outputs, slice(None))

    def subset(self, idx: np.ndarray) -> TeacherCache:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return TeacherCache(self._get(self.outputs, t), {k: self._get(v, t) for k, v in self.feats.items()},
                            self.device, False)


@dataclass
class StepData:
    """What one step trains on (the pipeline prepares it)."""

    table: Table
    labels: torch.Tensor | None
    cache: TeacherCache | None  # None when the step augments (teacher runs per batch)
    info: dict[str, Any] = field(default_factory=dict)


class ProgressTracker:
    """Turns finished epochs into ``reporter.progress`` dicts.

    ``fraction`` counts epochs across all steps (and the baseline), so it reaches exactly 1.0
    after the last epoch; ``eta_seconds`` is mean epoch time times the epochs left.
    """

    def __init__(self, reporter: Reporter, total_epochs: int):
        self.reporter = reporter
        self.total_epochs = max(1, total_epochs)
        self.done_epochs = 0
        self.epoch_seconds: list[float] = []

    def skip(self, epochs: int) -> None:
        self.done_epochs += epochs

    def step_started(self, *, step_index: int, step_kind: str, epochs: int) -> None:
        """Announce a new step (also those without epochs, e.g. post-training quantization)."""
        remaining = self.total_epochs - self.done_epochs
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None
        self.reporter.progress({
            "step_index": step_index, "step_kind": step_kind, "epoch": 0, "epochs": epochs,
            # Work remains even when no epochs do (quantization, exports): 1.0 is reserved for the end.
            "fraction": min(self.done_epochs / self.total_epochs, 0.99),
            "eta_seconds": float(mean * remaining) if mean is not None and remaining > 0 else None,
        })

    def epoch_done(self, *, step_index: int, step_kind: str, epoch: int, epochs: int, seconds: float) -> None:
        self.done_epochs += 1
        self.epoch_seconds.append(seconds)
        remaining = self.total_epochs - self.done_epochs
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.reporter.progress(
            {
                "step_index": step_index,
                "step_kind": step_kind,
                "epoch": epoch,
                "epochs": epochs,
                "fraction": 1.0 if remaining <= 0 else self.done_epochs / self.total_epochs,
                "eta_seconds": float(mean * remaining) if remaining > 0 else 0.0,
            }
        )


@dataclass
class TrainContext:
    """Everything a step needs. Steps may replace ``student``/``architecture``.

    ``val``: held-out inputs; ``t_val``: the teacher's held-out outputs [N, D];
    ``y_val``: labels or None. ``step_data(step, index, features)`` returns the
    step's :class:`StepData` (pipeline-provided: dataset choice, coreset, synthesis, cache).
    """

    student: nn.Module
    architecture: dict[str, Any]
    device: torch.device
    task: str
    teacher: Any
    val: Table
    t_val: torch.Tensor
    y_val: torch.Tensor | None
    reporter: Reporter
    generator: torch.Generator
    progress: ProgressTracker
    step_data: Callable[[Any, int, Sequence[str]], StepData]
    history: list[dict[str, Any]] = field(default_factory=list)
    step_info: dict[int, dict[str, Any]] = field(default_factory=dict)
    baseline: bool = False  # train on labels only (CE / MSE), no teacher
    metric_prefix: str = "val_"
    #: builds a fresh student of the job's family for other inputs (``input_reduction``): list[InputInfo] -> (model, arch)
    make_student: Callable[[Any], tuple[nn.Module, dict[str, Any]]] | None = None
    seed: int = 0
    #: filled by compression steps: what the step did (``prune`` stats, ``quantization`` notes, ...)
    #: and how to export its output (see :mod:`.compress`)
    step_outputs: dict[int, Any] = field(default_factory=dict)
    #: scratch files of compression steps (ONNX before/after quantization); removed after the steps
    work_dir: Path = Path("work")
    #: :class:`.checkpoint.JobCheckpoints` when the job checkpoints (``fit(..., resumable=True)`` uses it)
    checkpoint: Any = None

    def predict(self) -> torch.Tensor:
        model = self.student
        if getattr(model, "cpu_only", False):  # quantized torch / ONNX Runtime models run on CPU
            def take(a: int, b: int) -> list[torch.Tensor]:
                return [t.cpu() for t in self.val.slice(a, b)]

            return predict(model, None, take=take, n=self.val.n).to(self.t_val.device)  # type: ignore[arg-type]
        return predict(model, None, take=self.val.slice, n=self.val.n)  # type: ignore[arg-type]

    def evaluate(self, outputs: torch.Tensor | None = None) -> dict[str, float]:
        """Held-out task metrics of the current student."""
        if outputs is None:
            outputs = self.predict()
        return task_metrics(self.task, outputs, self.t_val, self.y_val)

    def check_stop(self, where: str) -> None:
        if self.reporter.should_stop():
            raise Cancelled(f"job cancelled by request {where}")


# ---------------------------------------------------------------------------------------------
# augmentation


def augment_batch(xs: list[torch.Tensor], cfg: Any, gen: torch.Generator
                  ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, float] | None]:
    """Flip/shift (N×C×H×W float inputs), noise (float inputs), mixup (float inputs).

    Returns the augmented inputs and ``(perm, lam)`` when mixup mixed rows.
    """
    out = []
    b = xs[0].shape[0]
    for x in xs:
        if not x.is_floating_point():
            out.append(x)
            continue
        if x.dim() == 4:
            if cfg.flip:
                mask = (torch.rand(b, generator=gen) < 0.5).to(x.device)
                x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
            if cfg.shift:
                s = int(cfg.shift)
                padded = F.pad(x, (s, s, s, s))
                dx = torch.randint(0, 2 * s + 1, (b,), generator=gen).tolist()
                dy = torch.randint(0, 2 * s + 1, (b,), generator=gen).tolist()
                h, w = x.shape[-2:]
                x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        if cfg.noise:
            x = x + cfg.noise * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        out.append(x)
    mix = None
    if cfg.mixup and b > 1:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        lam = float(np.random.default_rng(seed).beta(cfg.mixup, cfg.mixup))
        perm = torch.randperm(b, generator=gen).to(xs[0].device)
        out = [lam * x + (1 - lam) * x[perm] if x.is_floating_point() else x for x in out]
        mix = (perm, lam)
    return out, mix


# ---------------------------------------------------------------------------------------------
# hints


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
                    raise EngineError("invalid_spec", "hint student 'penultimate' needs a student with an nn.Linear "
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
                raise EngineError("invalid_spec", f"student has no module named {name!r}; available: penultimate, "
                                  + ", ".join(n for n in modules if n))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def build_hint_losses(step: Any, teacher_shapes: Mapping[str, tuple[int, ...]],
                      student_shapes: Mapping[str, tuple[int, ...]], device: torch.device) -> list[nn.Module]:
    from engine.losses import hints as hint_losses

    out = []
    for h in step.hints:
        out.append(hint_losses.HintLoss(h.distance, tuple(teacher_shapes[h.teacher]),
                                        tuple(student_shapes[h.student])).to(device))
    return out


# ---------------------------------------------------------------------------------------------
# the loop


def label_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]:
    """The baseline's loss: cross-entropy (classification) or MSE (regression) against labels."""

    def loss(s: torch.Tensor, _t: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None
        if task == "classification":
            return F.cross_entropy(s.float(), y)
        return F.mse_loss(s.float(), y.float().reshape(s.shape))

    return loss


def _metric_value(name: str, metrics: Mapping[str, float], val_loss: float) -> float:
    return val_loss if name == "loss" else metrics[name]


def resolve_stop_metric(metric: str, task: str, has_labels: bool) -> str:
    if metric == "auto":
        return headline_metric(task, has_labels)
    if metric == "mse" and task == "regression" and not has_labels:
        return "agreement_mse"
    return metric


def fit(ctx: TrainContext, step: Any, step_index: int, *, after_step: Callable[[nn.Module], None] | None = None,
        epoch_offset: int = 0, total_epochs: int | None = None, resumable: bool = False) -> None:
    """Train ``ctx.student`` for one step (see module docstring). Records history and step info.

    ``after_step(model)`` runs after every optimizer step (e.g. :func:`.prune.reapply_masks` keeping
    pruned weights at zero); ``epoch_offset`` numbers the epochs of repeated fine-tunes in one step and
    ``total_epochs`` is that step's epoch count for progress. ``resumable``: this call is the whole
    training of a step, so with ``ctx.checkpoint`` it checkpoints after epochs and continues from a
    saved epoch (student, optimizer, schedule, early stopping, hint adapters, RNG states).
    """
    from engine.training import checkpoint as ckpt_mod

    ckpt = ctx.checkpoint if resumable else None
    resume = ckpt.fit_resume(step_index) if ckpt is not None else None
    baseline = ctx.baseline
    hints = [] if baseline else list(step.hints)
    augment = step.augment if (step.augment is not None and step.augment.active) else None
    teacher_feats = list(dict.fromkeys(h.teacher for h in hints))
    data = ctx.step_data(step, step_index, teacher_feats)
    model = ctx.student
    dev = ctx.device
    n = data.table.n
    bs = min(step.config.batch_size, n)
    loss_fn: Callable = label_loss(ctx.task) if baseline else step.loss
    if baseline and data.labels is None:
        raise EngineError("invalid_spec", f"baseline: step {step_index} has no labels to train on")

    # hints: student hooks + adapters sized by one probe batch
    sfeat = StudentFeatures(model, [h.student for h in hints]) if hints else None
    hint_modules: list[nn.Module] = []
    try:
        if hints:
            probe_idx = torch.arange(min(2, n))
            xs = data.table.take(probe_idx)
            if data.cache is not None:
                _, tf = data.cache.take(probe_idx)
            else:
                tf = ctx.teacher.features(data.table.batch_dict(xs), teacher_feats)
            with torch.no_grad():
                was = model.training
                model.eval()
                model(*xs)
                model.train(was)
            hint_modules = build_hint_losses(step, {k: tuple(v.shape[1:]) for k, v in tf.items()},
                                             {k: tuple(v.shape[1:]) for k, v in sfeat.got.items()}, dev)  # type: ignore[union-attr]
        params = list(model.parameters()) + [p for m in hint_modules for p in m.parameters()]
        optimizer = step.optimizer.create([p for p in params if p.requires_grad])
        epochs = step.config.epochs
        steps_per_epoch = math.ceil(n / bs)
        sched = Scheduler(optimizer, step.schedule, epochs * steps_per_epoch)
        es = step.early_stopping
        stop_metric = resolve_stop_metric(es.metric, ctx.task, ctx.y_val is not None) if es else None
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        bad_epochs = 0
        use_amp = dev.type == "cuda"
        lrs: list[float] = []
        kind = "baseline" if baseline else step.name
        prefix = "baseline_" if baseline else ctx.metric_prefix
        start_epoch, stopped, epoch = 1, False, 0
        if resume is not None:
            restored = ckpt_mod.restore_fit(resume, model=model, hint_modules=hint_modules, optimizer=optimizer,
                                            scheduler=sched, generator=ctx.generator, device=dev)
            if restored is None:
                ctx.reporter.event("checkpoint", f"step {step_index}: the saved training state does not fit this "
                                   "step; training it from its start", level="warning", data={"step": step_index})
            else:
                epoch, stopped = restored["epoch"], restored["stopped"]
                start_epoch = epoch + 1
                best, bad_epochs, lrs = restored["best"], restored["bad_epochs"], restored["lrs"]
        last_epoch = epoch if stopped else epochs
        for epoch in range(start_epoch, last_epoch + 1):
            started = time.perf_counter()
            model.train()
            for m in hint_modules:
                m.train()
            order = torch.randperm(n, generator=ctx.generator)
            if not data.table.lazy:
                order = order.to(dev)
            loss_sum = torch.zeros((), device=dev)
            for start in range(0, n, bs):
                ctx.check_stop(f"during step {step_index}, epoch {epoch}")
                idx = order[start:start + bs]
                xs = data.table.take(idx)
                y = data.labels[idx.to(data.labels.device)] if data.labels is not None else None
                mix = None
                if augment is not None:
                    xs, mix = augment_batch(xs, augment, ctx.generator)
                t_out: torch.Tensor | None = None
                t_feats: dict[str, torch.Tensor] = {}
                if not baseline:
                    if augment is not None:
                        batch = data.table.batch_dict(xs)
                        t_out = ctx.teacher(batch)
                        t_feats = ctx.teacher.features(batch, teacher_feats) if teacher_feats else {}
                        # made in inference mode: losses that save them for backward (hint MSE) need normal tensors
                        t_feats = {k: f.clone() for k, f in t_feats.items()}
                    else:
                        assert data.cache is not None
                        t_out, t_feats = data.cache.take(idx)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    s_out = model(*xs)
                    s_out = s_out.float()
                    if mix is not None and y is not None:
                        perm, lam = mix
                        loss = lam * loss_fn(s_out, t_out, y) + (1 - lam) * loss_fn(s_out, t_out, y[perm])
                    else:
                        loss = loss_fn(s_out, t_out, y)
                    for h, hm in zip(hints, hint_modules):
                        loss = loss + h.weight * hm(sfeat.got[h.student].float(), t_feats[h.teacher])  # type: ignore[union-attr]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if step.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, step.config.grad_clip)
                optimizer.step()
                if after_step is not None:
                    after_step(model)
                lrs.append(sched.lr)
                sched.step()
                loss_sum += loss.detach() * idx.shape[0]
            train_loss = float(loss_sum) / n
            if not math.isfinite(train_loss):
                raise EngineError(
                    "invalid_spec",
                    f"training diverged in step {step_index}, epoch {epoch} (loss is {train_loss}); "
                    "try a lower learning rate",
                )
            outputs = ctx.predict()
            metrics = ctx.evaluate(outputs)
            val_loss = float("nan")
            if stop_metric == "loss":
                with torch.no_grad():
                    val_loss = float(loss_fn(outputs, ctx.t_val, ctx.y_val))
            rep = ctx.reporter
            epoch_no = epoch + epoch_offset
            rep.metric(step=step_index, epoch=epoch_no, name=f"{'baseline_' if baseline else ''}train_loss", value=train_loss)
            for k, v in metrics.items():
                rep.metric(step=step_index, epoch=epoch_no, name=f"{prefix}{k}", value=v)
            ctx.history.append({"step": step_index, "epoch": epoch_no, "train_loss": train_loss, "lr": lrs[-1],
                                "baseline": baseline, **metrics})
            ctx.progress.epoch_done(step_index=step_index, step_kind=kind, epoch=epoch_no,
                                    epochs=total_epochs or epochs,
                                    seconds=time.perf_counter() - started)
            if es is not None and stop_metric is not None:
                value = _metric_value(stop_metric, metrics, val_loss)
                higher = stop_metric in HIGHER_IS_BETTER
                improved = best is None or (value > best[0] + es.min_delta if higher else value < best[0] - es.min_delta)
                if improved:
                    best = (value, epoch, copy.deepcopy(model.state_dict()))
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= es.patience:
                        ctx.progress.skip(epochs - epoch)
                        rep.event("early_stopping", f"step {step_index}: no improvement of {stop_metric} for "
                                  f"{es.patience} epochs; stopped after epoch {epoch}",
                                  data={"step": step_index, "epoch": epoch, "metric": stop_metric})
                        stopped = True
            if ckpt is not None:
                ckpt.epoch_end(step_index, epoch, functools.partial(
                    ckpt_mod.fit_state, model=model, hint_modules=hint_modules, optimizer=optimizer, scheduler=sched,
                    best=best, bad_epochs=bad_epochs, stopped=stopped, epoch=epoch, lrs=lrs, generator=ctx.generator))
            if stopped:
                break
        info = ctx.step_info.setdefault(step_index, {})
        info.update(data.info)
        info["lr_first"] = lrs[0] if lrs else None
        info["lr_last"] = lrs[-1] if lrs else None
        info["epochs_run"] = epoch
        if best is not None:
            model.load_state_dict(best[2])
            info["early_stopping"] = {"metric": stop_metric, "best_epoch": best[1], "best_value": best[0],
                                      "epochs_run": epoch}
            ctx.reporter.event("early_stopping", f"step {step_index}: restored the weights of epoch {best[1]} "
                               f"({stop_metric} {best[0]:.4f})", data=info["early_stopping"])
    finally:
        if sfeat is not None:
            sfeat.close()
