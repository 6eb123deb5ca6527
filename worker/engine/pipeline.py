"""``run()``: one distillation job from spec to artifacts.

Phases (each announced with ``reporter.event``):

1. ``validate`` - parse the spec, load every dataset and the teacher, run the
   teacher on 2 rows of each dataset, check task/loss/label compatibility.
   Fails in well under a second for mismatched inputs, before anything expensive.
2. ``load`` - the held-out rows (``eval_dataset_id``, else ``x_val``/a seeded split of
   the job's dataset, else a slice of synthetic data) and each step's training rows.
3. ``teacher_outputs`` - teacher outputs (and hint features) cached once per transfer set
   (skipped for steps that augment: the teacher then runs on every augmented batch).
4. ``step_started``/``step_finished`` - each step trains the student (``synthesize``,
   ``coreset`` events where used); ``baseline`` trains the label-only twin.
5. ``export`` - write and verify the requested student formats.
6. ``report`` - measure sizes/latencies and write ``report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import io
import json
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Importing the plugin modules registers them.
from . import compress as compress_mod
from . import export as export_mod
from . import losses as _losses  # noqa: F401
from . import optim as _optim  # noqa: F401
from . import steps as _steps  # noqa: F401
from . import students as _students
from . import teachers as _teachers
from . import checkpoint as ckpt_mod
from .data import Dataset, check_label_range, load_dataset, split_dataset
from . import evaluate as evaluate_mod
from .evaluate import METRIC_KEYS, task_metrics, teacher_metrics
from .registry import exports as export_registry
from .report import build_report, file_sha256, measure_latency, model_row, spec_sha256, versions, write_report
from .spec import JobSpec, parse_spec
from .teachers import Teacher, load_teacher, probe_teacher
from .train import ProgressTracker, StepData, Table, TeacherCache, TrainContext, fit
from .types import (
    ArtifactFile,
    DatasetSource,
    EngineError,
    EngineResult,
    InputInfo,
    ModelSource,
    QualityGateFailed,
    TASKS,
    Reporter,
    TeacherInfo,
    TeacherSource,
)

#: Held-out rows used to verify exports (enough to catch numeric drift, cheap).
VERIFY_ROWS = 256
#: Share of synthetic samples held out when a data-free job has no eval dataset.
SYNTHETIC_VAL_FRACTION = 0.1
DEFAULT_DATASET_KEY = "dataset"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise EngineError("unsupported", f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise EngineError("invalid_spec", f"unknown device {device!r} (expected 'auto', 'cpu' or 'cuda')")


def _student_size_bytes(model: nn.Module, example: list[torch.Tensor]) -> int:
    """Size of the student as a TorchScript archive (what a user would ship)."""
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(export_mod.script_student(model, example), buffer)
        return buffer.tell()
    except Exception:
        return _students.state_dict_bytes(model)


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    model = model.eval()
    params = list(model.parameters())
    if not params or params[0].device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu().eval()


def _to_tensors(batch: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
    out = []
    for v in batch.values():
        v = np.asarray(v)
        v = v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(v)))
    return out


def _student_latency(model: nn.Module, x: Mapping[str, np.ndarray]) -> dict[str, float]:
    cpu_model = _cpu_eval_copy(model)

    def make(batch: Mapping[str, np.ndarray]):
        ts = _to_tensors(batch)

        def call():
            with torch.inference_mode():
                return cpu_model(*ts)

        return call

    return measure_latency(make, x)


def _first_rows(arrays: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[: min(n, v.shape[0])]) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# validation


@dataclass
class _Validated:
    job: JobSpec
    device: torch.device
    datasets: dict[str, Dataset]
    sources: dict[str, DatasetSource]
    teacher: Teacher
    out_dim: int
    task: str
    inputs: list[str]
    row_shapes: dict[str, tuple[int, ...]]
    notes: dict[str, Any] = field(default_factory=dict)


def _dataset_map(job: JobSpec, datasets: Any) -> dict[str, DatasetSource]:
    if datasets is None:
        return {}
    if isinstance(datasets, DatasetSource):
        key = job.dataset_id or DEFAULT_DATASET_KEY
        if job.dataset_id is None:
            job.dataset_id = key
        return {key: datasets}
    if not isinstance(datasets, Mapping):
        raise EngineError("invalid_spec", f"datasets must be a mapping of id -> DatasetSource, got {type(datasets).__name__}")
    return dict(datasets)


def _step_dataset_id(job: JobSpec, step: Any) -> str | None:
    if getattr(step, "synthesize", None) is not None:
        return None
    return getattr(step, "dataset_id", None) or job.dataset_id


def _validate(spec: Mapping[str, Any], teacher: TeacherSource, datasets: Any, reporter: Reporter,
              device: str, threads: int | None, out_dir: Path) -> _Validated:
    """Cheap checks that catch every mismatch before anything expensive runs."""
    reporter.event("validate", "checking spec, datasets and teacher")
    job = parse_spec(spec)
    dev = resolve_device(device)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EngineError("invalid_spec", f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    sources = _dataset_map(job, datasets)
    task = getattr(teacher, "task", "classification")
    if task not in TASKS:
        raise EngineError("unsupported", f"teacher task {task!r} is not supported ({', '.join(TASKS)})")

    # which datasets the job needs
    needed: list[str] = []
    for i, step in enumerate(job.steps):
        ds_id = _step_dataset_id(job, step)
        if ds_id is None and getattr(step, "synthesize", None) is None:
            raise EngineError("invalid_spec", f"steps[{i}] has no data: give 'dataset_id' (job or step) or 'synthesize'")
        if ds_id is not None:
            needed.append(ds_id)
    if job.eval_dataset_id:
        needed.append(job.eval_dataset_id)
    if job.dataset_id and job.dataset_id in sources:
        needed.insert(0, job.dataset_id)
    needed = list(dict.fromkeys(needed))
    missing = [d for d in needed if d not in sources]
    if missing:
        raise EngineError("invalid_spec", f"dataset {missing[0]!r} is named by the spec but was not provided "
                          f"(provided: {', '.join(sources) or 'none'})")

    # per-step static checks
    for i, step in enumerate(job.steps):
        loss = getattr(step, "loss", None)
        if loss is None and getattr(step, "finetune", None) is not None:
            loss = step.finetune.loss
        tasks = getattr(loss, "tasks", None) if loss is not None else None
        if tasks is not None and task not in tasks:
            suggestion = {"classification": "kd, soft_ce, hard or mse", "regression": "mse",
                          "embedding": "cosine or mse"}.get(task, "")
            raise EngineError("invalid_spec", f"steps[{i}].loss: {loss.name!r} works for "
                              f"{' / '.join(sorted(tasks))} teachers, but this teacher's task is {task!r}"
                              + (f" (use {suggestion})" if suggestion else ""))
        es = getattr(step, "early_stopping", None)
        if es is not None:
            ok = {"auto": True, "loss": True, "agreement": task == "classification",
                  "accuracy": task == "classification", "mse": task in ("regression", "embedding"),
                  "cosine": task == "embedding"}[es.metric]
            if not ok:
                raise EngineError("invalid_spec", f"steps[{i}].early_stopping.metric: {es.metric!r} does not apply "
                                  f"to a {task} teacher")
        gate = getattr(step, "gate", None)
        if gate is not None:
            fits = {"accuracy": task == "classification", "agreement": task == "classification",
                    "f1_macro": task == "classification", "r2": task == "regression",
                    "cosine": task == "embedding"}[gate.metric]
            if not fits:
                raise EngineError("invalid_spec", f"steps[{i}].gate.metric: {gate.metric!r} does not apply to a "
                                  f"{task} teacher")
        if getattr(step, "synthesize", None) is not None and task != "classification":
            raise EngineError("invalid_spec", f"steps[{i}].synthesize: data-free distillation needs a "
                              f"classification teacher (this one is {task!r})")

    cache_dir = Path(out_dir) / "cache"
    loaded: dict[str, Dataset] = {}
    for ds_id in needed:
        try:
            loaded[ds_id] = load_dataset(sources[ds_id], cache_dir)
        except EngineError as exc:
            if len(needed) > 1:
                raise EngineError(exc.code, f"dataset {ds_id!r}: {exc.message}") from None
            raise
    tch = load_teacher(teacher, dev, threads)
    if any(getattr(s, "synthesize", None) is not None for s in job.steps) and tch.module is None:
        raise EngineError("invalid_spec", "data-free distillation needs a torch teacher "
                          "(TorchScript, torch.export or safetensors)")

    # inputs: every dataset must feed the same inputs
    inputs: list[str] | None = None
    row_shapes: dict[str, tuple[int, ...]] = {}
    out_dim: int | None = None
    for ds_id, ds in loaded.items():
        if inputs is None:
            inputs, row_shapes = list(ds.inputs), ds.row_shapes()
        elif list(ds.inputs) != inputs or ds.row_shapes() != row_shapes:
            raise EngineError("shape_mismatch", f"dataset {ds_id!r} has inputs "
                              f"{ {k: list(v) for k, v in ds.row_shapes().items()} } but the job's first dataset has "
                              f"{ {k: list(v) for k, v in row_shapes.items()} }")
        width = probe_teacher(tch, _first_rows(ds.x, 2))
        if out_dim is not None and width != out_dim:
            raise EngineError("shape_mismatch", f"teacher output width differs between datasets ({out_dim} vs {width})")
        out_dim = width
    if inputs is None:  # data-free only
        assert job.input_spec is not None
        inputs = ["x"]
        row_shapes = {"x": tuple(job.input_spec["shape"])}
        lo, hi = job.input_spec["range"]
        probe = {"x": np.full((2, *row_shapes["x"]), (lo + hi) / 2, dtype=np.float32)}
        out_dim = probe_teacher(tch, probe)
    elif job.input_spec is not None and any(getattr(s, "synthesize", None) is not None for s in job.steps):
        if len(inputs) != 1 or tuple(job.input_spec["shape"]) != row_shapes[inputs[0]]:
            raise EngineError("shape_mismatch", f"input_spec.shape {job.input_spec['shape']} does not match the "
                              f"data's rows {[list(v) for v in row_shapes.values()]}")
    assert out_dim is not None
    tch.bind(inputs)

    # labels vs task
    for ds_id, ds in loaded.items():
        where = f"dataset {ds_id!r}: " if len(loaded) > 1 else ""
        try:
            if task == "classification":
                check_label_range(ds, out_dim)
            elif task == "regression":
                for key, y in (("y", ds.y), ("y_val", ds.y_val)):
                    if y is None:
                        continue
                    width = 1 if y.ndim == 1 else y.shape[1]
                    if width != out_dim:
                        raise EngineError("invalid_dataset", f"array {key!r} has {width} target(s) per row but "
                                          f"the teacher predicts {out_dim}")
                    ds.y = ds.y.astype(np.float32) if ds.y is not None else None
                    ds.y_val = ds.y_val.astype(np.float32) if ds.y_val is not None else None
        except EngineError as exc:
            raise EngineError(exc.code, where + exc.message) from None
    if job.baseline:
        if task == "embedding":
            raise EngineError("invalid_spec", "baseline: an embedding teacher has no labels to train a baseline on")
        for i, step in enumerate(job.steps):
            ds_id = _step_dataset_id(job, step)
            if ds_id is None:
                raise EngineError("invalid_spec", f"baseline needs labelled data, but steps[{i}] is data-free")
            if loaded[ds_id].y is None:
                raise EngineError("invalid_spec", f"baseline needs labels, but dataset {ds_id!r} "
                                  f"(steps[{i}]) has none")

    primary = loaded.get(job.dataset_id or "") or (next(iter(loaded.values())) if loaded else None)
    for i, step in enumerate(job.steps):
        gate = getattr(step, "gate", None)
        if gate is not None and gate.metric in ("accuracy", "f1_macro", "r2") and (primary is None or primary.y is None):
            raise EngineError("invalid_spec", f"steps[{i}].gate.metric: {gate.metric!r} needs labels in the "
                              "dataset (use 'agreement' for unlabelled data)")
    if job.student is None and tch.module is None:
        for i, step in enumerate(job.steps):
            if not (step.name == "quantize" and step.method == "onnx_int8"):
                raise EngineError("unsupported", f"steps[{i}] ({step.name} {step.method}) needs a torch model, but the "
                                  f"job has no student and the teacher is ONNX; only 'quantize' with method "
                                  "'onnx_int8' works directly on an ONNX teacher (or add a student and a distill step)")
    reporter.event(
        "validate",
        f"datasets and teacher are compatible: task {task}, inputs "
        + ", ".join(f"{k} {list(v)}" for k, v in row_shapes.items()) + f", teacher output width {out_dim}"
        + (f", {primary.num_rows} rows, {'labelled' if primary.y is not None else 'unlabelled'}" if primary else
           ", data-free"),
        data={
            "task": task,
            "datasets": {k: {"rows": v.num_rows, "labelled": v.y is not None, "has_val": v.x_val is not None}
                         for k, v in loaded.items()},
            "inputs": {k: list(v) for k, v in row_shapes.items()},
            "output_width": out_dim,
            "num_classes": out_dim if task == "classification" else None,
            # kept for older readers
            "rows": primary.num_rows if primary else 0,
            "row_shape": list(row_shapes[inputs[0]]),
            "labelled": bool(primary is not None and primary.y is not None),
            "has_x_val": bool(primary is not None and primary.x_val is not None),
        },
    )
    return _Validated(job, dev, loaded, sources, tch, out_dim, task, inputs, row_shapes)


# ---------------------------------------------------------------------------------------------
# data plan: held-out rows, per-step training rows, teacher caches


def _labels_tensor(y: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if y is None else torch.from_numpy(np.ascontiguousarray(y)).to(device)


class _DataPlan:
    """Owns held-out data and builds each step's training data on demand (cached per dataset)."""

    def __init__(self, v: _Validated, reporter: Reporter, out_dir: Path):
        self.v, self.reporter, self.out_dir = v, reporter, out_dir
        self.cache_dir = out_dir / "cache"
        self.train_arrays: dict[str, tuple[dict[str, Any], np.ndarray | None]] = {}
        self.tables: dict[str, Table] = {}
        self.caches: dict[tuple, TeacherCache] = {}
        self.synthetic: dict[int, torch.Tensor] = {}
        self.val_source = ""
        self.eval_dataset: str | None = None
        self.coreset_rows: dict[tuple, np.ndarray] = {}
        self.step_memo: dict[tuple, StepData] = {}
        job = v.job
        dev = v.device
        held_from: str | None = None
        if job.eval_dataset_id:
            ds = v.datasets[job.eval_dataset_id]
            if ds.x_val is not None:
                val_x, val_y = ds.x_val, ds.y_val
            else:
                val_x, val_y = ds.x, ds.y
            self.val_source = "eval_dataset"
            self.eval_dataset = job.eval_dataset_id
        else:
            held_from = job.dataset_id if job.dataset_id in v.datasets else next(
                (d for d in (_step_dataset_id(job, s) for s in job.steps) if d), None)
            if held_from is not None:
                split = split_dataset(v.datasets[held_from], job.val_fraction, job.seed)
                self.train_arrays[held_from] = (split.x_train, split.y_train)
                val_x, val_y = split.x_val, split.y_val
                self.val_source = split.val_source
                self.eval_dataset = held_from
            else:
                val_x, val_y = None, None
                self.val_source = "synthetic"
        for ds_id, ds in v.datasets.items():
            if ds_id not in self.train_arrays:
                self.train_arrays[ds_id] = (ds.x, ds.y)
        if val_x is None:
            # data-free without eval data: hold out a slice of the first synthetic set
            index = next(i for i, s in enumerate(job.steps) if getattr(s, "synthesize", None) is not None)
            samples = self._synthesize(job.steps[index], index)
            n_val = max(1, int(round(len(samples) * SYNTHETIC_VAL_FRACTION)))
            self.synthetic[index] = samples[:-n_val]
            val_x = {v.inputs[0]: samples[-n_val:].cpu().numpy()}
            val_y = None
        self.val_x = val_x
        self.val_y = val_y
        self.val = Table(val_x, dev)
        self.y_val = _labels_tensor(val_y, dev)
        started = time.perf_counter()
        self.t_val = TeacherCache.build(v.teacher, self.val, (), device=dev, cache_dir=None,
                                        should_stop=reporter.should_stop).all_outputs()
        self.teacher_seconds = time.perf_counter() - started

    # -- synthesis ---------------------------------------------------------------------------
    def _synthesize(self, step: Any, index: int) -> torch.Tensor:
        from . import datafree

        v = self.v
        cfg = step.synthesize
        spec = v.job.input_spec or {}
        self.reporter.event("synthesize", f"step {index}: training a generator against the teacher "
                            f"({cfg.generator_epochs} epochs) for {cfg.num_samples} synthetic samples",
                            data={"step": index, "num_samples": cfg.num_samples, "generator_epochs": cfg.generator_epochs})
        started = time.perf_counter()

        def on_epoch(epoch: int, metrics: Mapping[str, float] | None = None, *args: Any) -> None:
            for k, val in (metrics or {}).items():
                if isinstance(val, (int, float)):
                    self.reporter.metric(step=index, epoch=int(epoch), name=f"generator_{k}", value=float(val))

        samples = datafree.synthesize(
            v.teacher.module, tuple(spec["shape"]), tuple(spec["range"]), v.out_dim, dataclasses.asdict(cfg),
            generator=torch.Generator().manual_seed(v.job.seed + 1000 + index), device=v.device,
            should_stop=self.reporter.should_stop, on_epoch=on_epoch)
        samples = samples.detach().float().to(v.device)
        self.reporter.event("synthesize", f"step {index}: {len(samples)} synthetic samples in "
                            f"{time.perf_counter() - started:.1f}s", data={"step": index, "rows": len(samples)})
        return samples

    # -- training data -----------------------------------------------------------------------
    def _table(self, ds_id: str) -> Table:
        if ds_id not in self.tables:
            self.tables[ds_id] = Table(self.train_arrays[ds_id][0], self.v.device)
        return self.tables[ds_id]

    def _cache(self, key: tuple, table: Table, features: Sequence[str]) -> TeacherCache:
        if key not in self.caches:
            started = time.perf_counter()
            cache = TeacherCache.build(self.v.teacher, table, features, device=self.v.device,
                                       cache_dir=self.cache_dir, should_stop=self.reporter.should_stop,
                                       tag="-".join(str(k) for k in key[:2]))
            seconds = time.perf_counter() - started
            self.reporter.event(
                "teacher_outputs",
                f"teacher outputs cached for {table.n} rows of {key[0]} in {seconds:.2f}s"
                + (" (memory-mapped float16)" if cache.on_disk else ""),
                data={"dataset": key[0], "rows": table.n, "seconds": seconds, "on_disk": cache.on_disk,
                      "features": list(features)},
            )
            self.caches[key] = cache
        return self.caches[key]

    def step_data(self, step: Any, index: int, features: Sequence[str]) -> StepData:
        key = (index, tuple(features))
        if key not in self.step_memo:
            self.step_memo[key] = self._step_data(step, index, features)
        return self.step_memo[key]

    def _step_data(self, step: Any, index: int, features: Sequence[str]) -> StepData:
        v = self.v
        dev = v.device
        augmenting = step.augment is not None and step.augment.active
        feats = tuple(features)
        if step.synthesize is not None:
            if index not in self.synthetic:
                self.synthetic[index] = self._synthesize(step, index)
            samples = self.synthetic[index]
            table = Table.from_tensors({v.inputs[0]: samples}, dev)
            cache = None if augmenting else self._cache((f"synthetic{index}", "all", feats), table, feats)
            return StepData(table, None, cache, {"dataset": "synthetic", "rows": table.n, "synthetic": True,
                                                 "val_source": self.val_source})
        ds_id = _step_dataset_id(v.job, step)
        assert ds_id is not None
        table = self._table(ds_id)
        y = self.train_arrays[ds_id][1]
        info: dict[str, Any] = {"dataset": ds_id, "rows": table.n}
        if step.coreset is not None:
            cs = step.coreset
            rows = self._coreset(ds_id, table, cs, feats)
            info["coreset"] = {"method": cs.method, "fraction": cs.fraction, "rows_used": int(len(rows)),
                               "rows_total": table.n}
            info["rows"] = int(len(rows))
            self.reporter.event("coreset", f"step {index}: {cs.method} coreset of {len(rows)} of {table.n} rows",
                                data={"step": index, **info["coreset"]})
            key = (ds_id, f"coreset-{cs.method}-{cs.fraction}", feats)
            if augmenting:
                cache = None
            elif key in self.caches:
                cache = self.caches[key]
            elif (ds_id, "all", feats) in self.caches:
                cache = self.caches[(ds_id, "all", feats)].subset(rows)
                self.caches[key] = cache
            else:
                cache = self._cache(key, table.subset(rows), feats)
            sub = table.subset(rows)
            return StepData(sub, _labels_tensor(None if y is None else y[rows], dev), cache, info)
        cache = None if augmenting else self._cache((ds_id, "all", feats), table, feats)
        return StepData(table, _labels_tensor(y, dev), cache, info)

    def _coreset(self, ds_id: str, table: Table, cs: Any, feats: tuple) -> np.ndarray:
        key = (ds_id, cs.method, cs.fraction)
        if key in self.coreset_rows:
            return self.coreset_rows[key]
        n = table.n
        k = max(1, min(n, int(round(n * cs.fraction))))
        seed = self.v.job.seed
        if cs.method == "random" or k == n:
            rows = np.sort(np.random.default_rng(seed).permutation(n)[:k])
        else:
            float_cols = [np.asarray(a[:], dtype=np.float32).reshape(n, -1) for a in table.arrays.values()
                          if not np.issubdtype(np.asarray(a[:1]).dtype, np.integer)]
            if float_cols:
                points = torch.from_numpy(np.concatenate(float_cols, axis=1))
            else:  # token inputs: cluster in the teacher's output space
                points = self._cache((ds_id, "all", feats), table, feats).all_outputs().cpu()
            rows = kmeans_representatives(points, k, seed)
        self.coreset_rows[key] = rows
        return rows


def kmeans_representatives(points: torch.Tensor, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Indices of the rows nearest to each of ``k`` k-means centroids (k-means++ init, seeded); sorted, unique."""
    x = points.float()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(0, n, (1,), generator=g))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            nxt = int(torch.randint(0, n, (1,), generator=g))
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=g))
        centroids.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    c = torch.stack(centroids)

    def assign(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cdist(x[i:i + 4096], c).argmin(1) for i in range(0, n, 4096)])

    for _ in range(iters):
        a = assign(c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).float()
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if torch.allclose(new, c):
            break
        c = new
    nearest = torch.cat([torch.cdist(c[i:i + 1024], x).argmin(1) for i in range(0, k, 1024)])
    rows = np.unique(nearest.numpy())
    if len(rows) < k:  # ties: top up with the rows farthest from any representative, deterministically
        rest = np.setdiff1d(np.arange(n), rows)
        extra = np.random.default_rng(seed).permutation(rest)[: k - len(rows)]
        rows = np.sort(np.concatenate([rows, extra]))
    return rows


# ---------------------------------------------------------------------------------------------
# student


def _input_infos(v: _Validated) -> list[InputInfo]:
    infos = []
    for name in v.inputs:
        is_int, max_value = False, None
        for ds in v.datasets.values():
            if ds.is_integer(name):
                is_int = True
                for arr in (ds.x[name], (ds.x_val or {}).get(name)):
                    if arr is not None and len(arr):
                        m = int(np.asarray(arr).max())
                        max_value = m if max_value is None else max(max_value, m)
        infos.append(InputInfo(name, tuple(v.row_shapes[name]), is_int, max_value))
    return infos


def _teacher_as_student(v: _Validated, example: list[torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """No ``student`` in the spec: the steps compress the teacher itself (an editable copy)."""
    t = v.teacher
    if t.module is None:  # ONNX: only onnx_int8 steps (checked in _validate) - they quantize the file
        inverse = {data: sess for sess, data in getattr(t, "mapping", {}).items()}
        feeds = [inverse.get(name, name) for name in v.inputs]
        return compress_mod.OrtModule(t.path, feeds), {"family": "onnx", "source": "teacher"}
    if getattr(t, "architecture", None) and t.format == "safetensors":
        module = copy.deepcopy(t.module).cpu()
        architecture = {**dict(t.architecture), "source": "teacher"}
    else:
        from . import derive
        from .editable import to_editable

        try:
            module = to_editable(t.module, [e.detach().cpu()[:2] for e in example])
        except EngineError as exc:
            raise EngineError("unsupported", f"prune/quantize steps without a student work on the teacher itself, "
                              f"but: {exc.message}") from None
        try:
            architecture = {**derive.chain_architecture(module), "source": "teacher"}
        except EngineError:
            architecture = {"family": "teacher", "format": t.format}
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return module.train(), architecture


def _create_student(v: _Validated, models: Mapping[str, ModelSource] | None,
                    example: list[torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    student = v.job.student
    if student is None:
        return _teacher_as_student(v, example or [])
    if getattr(student, "kind", None) == "uploaded" or type(student).__name__ == "UploadedStudentRef":
        model_id = student.model_id
        if not models or model_id not in models:
            raise EngineError("invalid_spec", f"student model {model_id!r} was not provided")
        return _students.load_uploaded(models[model_id], _teachers.load_module)
    info = TeacherInfo(v.teacher.module, getattr(v.teacher, "architecture", None), v.teacher.format, v.task)
    try:
        return student.create(_input_infos(v), v.out_dim, info)
    except TypeError:
        # older student families: create(row_shape, out_features)
        return student.create(tuple(v.row_shapes[v.inputs[0]]), v.out_dim)


def _check_student(model: nn.Module, v: _Validated, example: list[torch.Tensor]) -> None:
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(*[e[:2] for e in example])
            model.train(was)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError("shape_mismatch", f"the student cannot take the data's inputs: "
                          f"{_teachers.error_summary(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != v.out_dim:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EngineError("shape_mismatch", f"the student outputs {shape} per batch but the teacher's outputs "
                          f"are [batch, {v.out_dim}]")


# ---------------------------------------------------------------------------------------------
# run


def _serialized(model: nn.Module, example: list[torch.Tensor]) -> bytes | None:
    """The bytes a user would ship: the ONNX file for ONNX Runtime models, else TorchScript."""
    if isinstance(model, compress_mod.OrtModule):
        return model.path.read_bytes()
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(export_mod.script_student(model, example), buffer)
        return buffer.getvalue()
    except Exception:
        return None


def _gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=6, mtime=0))


def _measure(ctx: TrainContext, example: list[torch.Tensor], val_x: Mapping[str, np.ndarray],
             metrics: Mapping[str, float]) -> dict[str, Any]:
    """A report row for the current model: counts, serialized (+ gzip) size, CPU latency, metrics."""
    cpu_model = _cpu_eval_copy(ctx.student)
    total, nonzero = compress_mod.parameter_counts(cpu_model)
    data = _serialized(cpu_model, example)
    size = len(data) if data is not None else _students.state_dict_bytes(cpu_model)
    row = model_row(total, size, _student_latency(cpu_model, val_x), metrics)
    row["nonzero_parameters"] = int(nonzero)
    row["size_gzip_bytes"] = _gzip_size(data) if data is not None else None
    ctx.student.to(ctx.device) if not getattr(ctx.student, "cpu_only", False) else None
    return row


def _gate_check(step: Any, index: int, row: dict[str, Any], teacher_row: Mapping[str, Any]) -> dict[str, Any] | None:
    gate = getattr(step, "gate", None)
    if gate is None:
        return None
    metric = gate.metric
    if metric not in row or metric not in teacher_row:
        raise EngineError("invalid_spec", f"steps[{index}].gate.metric: {metric!r} was not measured for this job")
    drop = float(teacher_row[metric]) - float(row[metric])
    return {"metric": metric, "teacher": float(teacher_row[metric]), "value": float(row[metric]),
            "drop": drop, "max_drop": float(gate.max_drop), "passed": drop <= gate.max_drop + 1e-12}


def _export_metrics(ctx: TrainContext, f: ArtifactFile) -> dict[str, float] | None:
    """Held-out metrics of a reloaded export (what a user gets from the file)."""
    if f.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(f.path), map_location="cpu")
    elif f.format == "onnx":
        model = compress_mod.OrtModule(f.path)
    else:
        return None

    def take(a: int, b: int) -> list[torch.Tensor]:
        return [t.cpu() for t in ctx.val.slice(a, b)]

    outputs = evaluate_mod.predict(model, None, take=take, n=ctx.val.n)  # type: ignore[arg-type]
    return task_metrics(ctx.task, outputs, ctx.t_val.cpu(), None if ctx.y_val is None else ctx.y_val.cpu())


def _export_step(job: JobSpec, ctx: TrainContext, example: list[torch.Tensor], inputs: list[str], out_dir: Path,
                 index: int) -> tuple[list[ArtifactFile], dict[str, Any], dict[str, str]]:
    """Write and verify step ``index``'s output in every requested format."""
    plan = ctx.step_outputs.get(index)
    extra = dict(plan.export) if plan is not None else {}
    export_input = export_mod.ExportInput(
        _cpu_eval_copy(ctx.student), ctx.architecture, example, out_dir, index,
        input_names=list(inputs), output_name="logits" if ctx.task == "classification" else "output",
        prefix=f"step{index}_" if len(job.steps) > 1 else "", task=ctx.task, **extra,
    )
    artifacts: list[ArtifactFile] = []
    measured: dict[str, Any] = {}
    for name in job.exports:
        try:
            files = export_registry.get(name)(None).export(export_input)
        except export_mod.SkipExport as exc:
            ctx.reporter.event("export", f"step {index}: {name} export skipped: {exc}", level="warning",
                               data={"step": index, "format": name, "skipped": str(exc)})
            measured[name] = {"skipped": str(exc)}
            continue
        artifacts += files
        for f in files:
            size = f.path.stat().st_size
            if f.kind == "student":
                m = _export_metrics(ctx, f)
                if m is not None:
                    measured[f.format] = {"file": f.path.name, "size_bytes": size, **m}
            ctx.reporter.event(
                "export",
                f"step {index}: exported {f.kind} as {f.format}: {f.path.name} ({size} bytes), verified",
                data={"step": index, "format": f.format, "kind": f.kind, "file": f.path.name, "size_bytes": size},
            )
    if ctx.device.type != "cpu" and not getattr(ctx.student, "cpu_only", False):
        ctx.student.to(ctx.device)
    return artifacts, measured, dict(export_input.notes)


# ---------------------------------------------------------------------------------------------
# checkpoints (see checkpoint.py)


class _Students:
    """Snapshots of the student at step starts, and rebuilding one from a checkpoint.

    A student can be rebuilt when its architecture is the job's initial one with the initial
    state_dict layout (it is then loaded into the freshly created initial student), or when
    :func:`.students.from_architecture` builds a module with exactly its state_dict layout.
    """

    def __init__(self, initial: nn.Module, architecture: Mapping[str, Any], device: torch.device):
        self.initial = initial
        self.initial_arch = self._key(architecture)
        self.initial_sig = self._sig(initial)
        self.device = device
        self.built: dict[str, dict | None] = {}

    @staticmethod
    def _key(architecture: Any) -> str:
        return json.dumps(architecture, sort_keys=True, default=ckpt_mod._json_default)

    @staticmethod
    def _sig(model: nn.Module) -> dict[str, Any] | None:
        if getattr(model, "cpu_only", False) or isinstance(model, compress_mod.OrtModule):
            return None
        try:
            return {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
        except Exception:  # noqa: BLE001
            return None

    def _built_sig(self, architecture: Any) -> dict | None:
        key = self._key(architecture)
        if key not in self.built:
            try:
                with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.built[key] = self._sig(_students.from_architecture(architecture))
            except Exception:  # noqa: BLE001 - not rebuildable
                self.built[key] = None
        return self.built[key]

    def _target_sig(self, architecture: Any) -> dict | None:
        if self._key(architecture) == self.initial_arch:
            return self.initial_sig
        return self._built_sig(architecture)

    def snapshot(self, ctx: TrainContext, *, last: bool) -> dict[str, Any] | None:
        """The start of the next step (``last``: no step follows, the student is not needed), or None."""
        architecture = json.loads(self._key(ctx.architecture))
        if last:
            return {"architecture": architecture, "student": None, "rng": None}
        sig = self._sig(ctx.student)
        if sig is None or sig != self._target_sig(ctx.architecture):
            return None
        return {
            "architecture": architecture,
            "student": {
                "state": ckpt_mod.cpu_state(ctx.student),
                "frozen": [n for n, p in ctx.student.named_parameters() if not p.requires_grad],
                "training": bool(ctx.student.training),
            },
            "rng": ckpt_mod.rng_state(ctx.generator),
        }

    def rebuild(self, architecture: Any, saved: Mapping[str, Any]) -> nn.Module:
        """The module ``saved`` describes (raises ValueError when it cannot be rebuilt)."""
        state = saved["state"]
        sig = {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}
        if sig != self._target_sig(architecture):
            raise ValueError("the saved student does not fit its architecture")
        if self._key(architecture) == self.initial_arch:
            model = self.initial
        else:
            model = _students.from_architecture(architecture)
        model.load_state_dict(state)
        frozen = set(saved["frozen"])
        for n, p in model.named_parameters():
            if p.is_floating_point():
                p.requires_grad_(n not in frozen)
        model.train(bool(saved["training"]))
        return model.to(self.device)


@dataclass
class _Resume:
    step: int
    epoch: int
    created_at: str
    rows: list[dict[str, Any]]
    artifacts: dict[int, list[ArtifactFile]]
    start: dict[str, Any] | None


def _checkpoint_identity(spec: Mapping[str, Any], v: _Validated, teacher: TeacherSource,
                         models: Mapping[str, ModelSource] | None) -> dict[str, Any]:
    return {
        "format": ckpt_mod.FORMAT_VERSION,
        "engine_sha256": ckpt_mod.engine_code_sha256(),
        "torch": torch.__version__,
        "spec_sha256": spec_sha256(spec),
        "data_sha256": {k: s.sha256 or file_sha256(Path(s.path)) for k, s in sorted(v.sources.items())
                        if k in v.datasets},
        "teacher_sha256": teacher.sha256 or file_sha256(Path(teacher.path)),
        "models_sha256": {k: m.sha256 or file_sha256(Path(m.path)) for k, m in sorted((models or {}).items())},
    }


def _resume(ckpts: ckpt_mod.JobCheckpoints, students: _Students, job: JobSpec, ctx: TrainContext,
            out_dir: Path) -> _Resume | None:
    """Restore the job state from ``checkpoint.pt`` when it matches; None (after a warning) when it does not."""
    loaded = ckpts.read()
    if loaded is None:
        return None
    meta, state = loaded["meta"], loaded["state"]
    try:
        n = len(job.steps)
        step, epoch = int(meta["step"]), int(meta["epoch"])
        if not 0 <= step <= n or int(meta["steps_total"]) != n or len(meta["rows"]) != step:
            raise ValueError(f"step {step} of {n} with {len(meta['rows'])} finished rows")
        architecture = meta["architecture"]
        start = None
        student = None
        if step < n:
            if state["student"] is None or state["rng"] is None:
                raise ValueError("no student saved")
            student = students.rebuild(architecture, state["student"])
            start = {"architecture": architecture, "student": state["student"], "rng": state["rng"]}
        ckpts.artifacts = list(meta["artifacts"])
        artifacts = ckpts.restore_artifacts(out_dir)
        if sorted(artifacts) != list(range(step)):
            raise ValueError("saved exports do not match the finished steps")
    except Exception as exc:  # noqa: BLE001 - an unusable checkpoint is ignored, never an error
        ckpts.artifacts = []
        ckpts._warn(f"ignoring a checkpoint that cannot be restored ({type(exc).__name__}: {str(exc)[:200]}); "
                    "starting over")
        return None
    if student is not None:
        ctx.student = student
    ctx.architecture = architecture
    ctx.history = list(meta["history"])
    ctx.step_info = {int(k): dict(val) for k, val in meta["step_info"]}
    ctx.progress.done_epochs = int(meta["progress"]["done_epochs"])
    ctx.progress.epoch_seconds = [float(x) for x in meta["progress"]["epoch_seconds"]]
    if state.get("fit") is not None and step < n:
        ckpts.pending_fit = (step, state["fit"])
    return _Resume(step, epoch, str(meta.get("created_at", "?")), list(meta["rows"]), artifacts, start)


@dataclass
class _StepsOutcome:
    rows: list[dict[str, Any]]
    artifacts: dict[int, list[ArtifactFile]]
    failed: dict[str, Any] | None = None
    message: str = ""


def _run_steps(job: JobSpec, ctx: TrainContext, example: list[torch.Tensor], val_x: Mapping[str, np.ndarray],
               teacher_metrics_row: Mapping[str, Any], inputs: list[str], out_dir: Path,
               students: _Students | None = None, resumed: _Resume | None = None) -> _StepsOutcome:
    """Run every step; one report row per step (measured right after it), its exports, its gate.

    With ``resumed``, the steps before ``resumed.step`` are skipped (their rows and exports come
    from the checkpoint); ``students`` snapshots each step's start for ``ctx.checkpoint``.
    """
    outcome = _StepsOutcome([], {})
    ckpt = ctx.checkpoint
    first = 0
    if resumed is not None:
        outcome.rows.extend(resumed.rows)
        outcome.artifacts.update(resumed.artifacts)
        first = resumed.step
    if ckpt is not None:
        ckpt.rows = outcome.rows
        ckpt.steps_total = len(job.steps)
    for index, step in enumerate(job.steps):
        if index < first:
            continue
        if index == first:
            if resumed is not None:
                assert resumed.start is not None and resumed.start["rng"] is not None
                ckpt_mod.set_rng_state(resumed.start["rng"], ctx.generator)
            if ckpt is not None and students is not None:
                ckpt.begin_step(index, resumed.start if resumed is not None else students.snapshot(ctx, last=False))
        ctx.reporter.event(
            "step_started",
            f"step {index}: {step.name} ({step.method}), {step.epochs} epochs",
            data={"index": index, "kind": step.name, "method": step.method, "epochs": step.epochs},
        )
        ctx.progress.step_started(step_index=index, step_kind=step.name, epochs=step.epochs)
        step.run(ctx, index)
        metrics = ctx.evaluate()
        row = _measure(ctx, example, val_x, metrics)
        info = ctx.step_info.get(index, {})
        data = {k: val for k, val in info.items()
                if k in ("dataset", "rows", "coreset", "synthetic", "val_source", "calibration_rows")}
        extra = {k: info[k] for k in ("early_stopping",) if k in info}
        plan = ctx.step_outputs.get(index)
        details = dict(plan.details) if plan is not None else {}
        full = {"index": index, "kind": step.name, "method": step.method, **row, "data": data, **extra, **details}
        gate = _gate_check(step, index, full, teacher_metrics_row)
        if gate is not None:
            full["gate"] = gate
        outcome.rows.append(full)
        ctx.reporter.event("step_finished", f"step {index} finished: " + _describe(metrics), data=metrics)
        if gate is not None and not gate["passed"]:
            what = f"{step.name} {step.method}"
            outcome.message = (f"step {index} ({what}): {gate['metric']} dropped {gate['drop']:.3f} below the "
                               f"teacher's (allowed {gate['max_drop']:.3f})")
            outcome.failed = {"failed_step": index, "metric": gate["metric"], "drop": gate["drop"],
                              "max_drop": gate["max_drop"]}
            ctx.reporter.event("quality_gate", outcome.message, level="error", data=outcome.failed)
            break
        if gate is not None:
            ctx.reporter.event("quality_gate", f"step {index}: {gate['metric']} drop {gate['drop']:.4f} within "
                               f"{gate['max_drop']:.4f}", data={"step": index, **gate})
        ctx.check_stop("before export")
        files, measured, notes = _export_step(job, ctx, example, inputs, out_dir, index)
        outcome.artifacts[index] = files
        ts_file = next((f.path for f in files if f.kind == "student" and f.format == "torchscript"), None)
        if ts_file is not None:  # sized as shipped
            full["size_bytes"] = ts_file.stat().st_size
            full["size_gzip_bytes"] = _gzip_size(ts_file.read_bytes())
        if measured:
            full["exports"] = measured
        if notes:
            full.setdefault("quantization", {})["export_notes"] = notes
        if ckpt is not None and students is not None:
            ckpt.step_done(index, files, students.snapshot(ctx, last=index + 1 >= len(job.steps)))
    return outcome


def run(
    spec: Mapping[str, Any],
    teacher: TeacherSource,
    datasets: Mapping[str, DatasetSource] | DatasetSource | None,
    out_dir: Path,
    reporter: Reporter,
    *,
    device: str = "auto",
    threads: int | None = None,
    models: Mapping[str, ModelSource] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every_seconds: float = 30.0,
) -> EngineResult:
    """Run the job ``spec`` describes on ``teacher``: distil, prune, quantize (steps in order).

    ``datasets`` maps dataset ids (``spec["dataset_id"]``, each step's ``dataset_id``,
    ``spec["eval_dataset_id"]``) to sources; a bare :class:`DatasetSource` is the job's
    dataset; None for data-free jobs. ``models`` maps ``student.model_id`` to a
    :class:`ModelSource`. Writes artifacts into ``out_dir`` and returns them with metrics and
    the report. Raises :class:`EngineError` (``.code``) for user-fixable problems,
    :class:`QualityGateFailed` (``.result`` = the last passing step's artifacts + report) when a
    step breaks its ``gate``, and :class:`Cancelled` when ``reporter.should_stop()`` turns True.

    ``checkpoint_dir``: keep ``checkpoint_dir/checkpoint.pt`` (after each step, and after a
    distill epoch when ``checkpoint_every_seconds`` passed since the last write; 0 = every epoch)
    and resume from it when it matches this job (see :mod:`.checkpoint`).
    """
    out_dir = Path(out_dir)
    v = _validate(spec, teacher, datasets, reporter, device, threads, out_dir)
    job, dev = v.job, v.device
    plan = _DataPlan(v, reporter, out_dir)
    t_val = plan.t_val
    teacher_row_metrics = teacher_metrics(v.task, t_val, plan.y_val)
    reporter.event(
        "load",
        f"{plan.val.n} held-out rows ({plan.val_source}) on {dev}; training rows: "
        + ", ".join(f"{k} {plan.train_arrays[k][0][v.inputs[0]].shape[0]}" for k in plan.train_arrays) or "synthetic",
        data={"val_rows": plan.val.n, "val_source": plan.val_source, "device": str(dev),
              "teacher_format": v.teacher.format,
              "train_rows": {k: int(a[0][v.inputs[0]].shape[0]) for k, a in plan.train_arrays.items()}},
    )
    reporter.event("teacher_outputs", f"teacher outputs cached for {plan.val.n} held-out rows in "
                   f"{plan.teacher_seconds:.2f}s", data={"seconds": plan.teacher_seconds, **teacher_row_metrics})

    example = plan.val.slice(0, VERIFY_ROWS)
    example_cpu = [e.detach().cpu() for e in example]
    val_x_np = {k: np.asarray(a[: min(64, a.shape[0])]) for k, a in plan.val_x.items()}

    # Seed right before anything random: weight init, dropout, batch order.
    torch.manual_seed(job.seed)
    student, architecture = _create_student(v, models, example_cpu)
    if not getattr(student, "cpu_only", False):
        student = student.to(dev)
    _check_student(student, v, example if not getattr(student, "cpu_only", False) else example_cpu)
    init_state = copy.deepcopy(student.state_dict()) if job.baseline else None
    total_epochs = sum(s.epochs for s in job.steps) * (2 if job.baseline else 1)
    progress = ProgressTracker(reporter, total_epochs)

    def make_student(infos: list[InputInfo]) -> tuple[nn.Module, dict[str, Any]]:
        info = TeacherInfo(v.teacher.module, getattr(v.teacher, "architecture", None), v.teacher.format, v.task)
        torch.manual_seed(job.seed)
        return job.student.create(infos, v.out_dim, info)

    ctx = TrainContext(
        student=student, architecture=architecture, device=dev, task=v.task, teacher=v.teacher,
        val=plan.val, t_val=t_val, y_val=plan.y_val, reporter=reporter,
        generator=torch.Generator().manual_seed(job.seed), progress=progress, step_data=plan.step_data,
        make_student=make_student if hasattr(job.student, "create") else None, seed=job.seed,
        work_dir=out_dir / "work",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    students: _Students | None = None
    resumed: _Resume | None = None
    if checkpoint_dir is not None:
        try:
            identity = _checkpoint_identity(spec, v, teacher, models)
        except OSError as exc:
            reporter.event("checkpoint", f"checkpoints are off: cannot hash the job's inputs ({exc})", level="warning")
        else:
            ckpts = ckpt_mod.JobCheckpoints(Path(checkpoint_dir), checkpoint_every_seconds, identity, reporter)
            ckpts.ctx = ctx
            ctx.checkpoint = ckpts
            students = _Students(ctx.student, ctx.architecture, dev)
            resumed = _resume(ckpts, students, job, ctx, out_dir)
            if resumed is not None:
                where = (f"step {resumed.step}, epoch {resumed.epoch}" if resumed.step < len(job.steps)
                         else "the end of the steps")
                reporter.event("resumed", f"resuming from {where} (checkpoint of {resumed.created_at})",
                               data={"step": resumed.step, "epoch": resumed.epoch, "steps": len(job.steps),
                                     "completed_steps": resumed.step, "checkpoint_time": resumed.created_at,
                                     "done_epochs": ctx.progress.done_epochs})
    teacher_row = model_row(
        v.teacher.num_parameters,
        v.teacher.size_bytes,
        measure_latency(v.teacher.latency_fn, val_x_np),
        teacher_row_metrics,
    )
    teacher_row.update(_teacher_extras(v, teacher))
    try:
        outcome = _run_steps(job, ctx, example_cpu, val_x_np, teacher_row, v.inputs, out_dir, students, resumed)
    finally:
        shutil.rmtree(out_dir / "work", ignore_errors=True)
    step_rows = outcome.rows

    baseline_row = None
    if job.baseline and outcome.failed is None:
        reporter.event("baseline", "training the same student on labels alone (same steps, epochs, optimizer, seed)")
        torch.manual_seed(job.seed)
        twin, _ = _create_student(v, models, example_cpu)
        twin = twin.to(dev)
        assert init_state is not None
        twin.load_state_dict(init_state)
        bctx = TrainContext(
            student=twin, architecture=architecture, device=dev, task=v.task, teacher=v.teacher,
            val=plan.val, t_val=t_val, y_val=plan.y_val, reporter=reporter,
            generator=torch.Generator().manual_seed(job.seed), progress=progress, step_data=plan.step_data,
            baseline=True,
        )
        for index, step in enumerate(job.steps):
            fit(bctx, step, index)
        bmetrics = bctx.evaluate()
        cpu_twin = _cpu_eval_copy(bctx.student)
        baseline_row = model_row(_students.num_parameters(twin), _student_size_bytes(cpu_twin, example_cpu),
                                 _student_latency(cpu_twin, val_x_np), bmetrics)
        reporter.event("baseline", "baseline finished: " + _describe(bmetrics), data=bmetrics)
    ctx.check_stop("before the report")

    # ---- report: the final student is the last passing step's row, sized as shipped.
    passed_rows = step_rows if outcome.failed is None else step_rows[:-1]
    final_src = passed_rows[-1] if passed_rows else None
    final = ({k: val for k, val in final_src.items() if k in _ROW_KEYS} if final_src is not None
             else {k: val for k, val in teacher_row.items() if k in _ROW_KEYS})
    primary_id = job.dataset_id if job.dataset_id in v.sources else next(iter(v.sources), None)
    first = v.datasets.get(primary_id) if primary_id else None
    report = build_report(
        architecture=ctx.architecture if outcome.failed is None else None,
        teacher=teacher_row,
        steps=step_rows,
        student=final,
        reproducibility={
            "seed": job.seed,
            "versions": versions(),
            "spec_sha256": spec_sha256(spec),
            "data_sha256": (v.sources[primary_id].sha256 or file_sha256(Path(v.sources[primary_id].path)))
            if primary_id else None,
            "datasets_sha256": {k: s.sha256 or file_sha256(Path(s.path)) for k, s in v.sources.items()
                                if k in v.datasets},
            "teacher_sha256": teacher.sha256 or file_sha256(Path(teacher.path)),
            "device": str(dev),
            "threads": torch.get_num_threads(),
        },
        data={
            "task": v.task,
            "train_rows": step_rows[0]["data"].get("rows") if step_rows else None,
            "val_rows": plan.val.n,
            "val_source": plan.val_source,
            "eval_dataset": plan.eval_dataset,
            "num_classes": v.out_dim if v.task == "classification" else None,
            "output_width": v.out_dim,
            "labelled": plan.y_val is not None,
            "input_shape": list(v.row_shapes[v.inputs[0]]),
            "inputs": {k: list(s) for k, s in v.row_shapes.items()},
            "classes": first.classes if first is not None else None,
            "steps": [r["data"] for r in step_rows],
            **({"note": "held-out metrics are measured on synthetic samples (no eval_dataset_id given)"}
               if plan.val_source == "synthetic" else {}),
        },
    )
    report["recipe"] = list(spec.get("steps") or [])
    if outcome.failed is not None:
        report["gate"] = outcome.failed
        if final_src is None:
            report["student"] = None
    if baseline_row is not None:
        report["baseline"] = baseline_row
        report["teacher_gain"] = {k: float(final[k]) - float(baseline_row[k]) for k in METRIC_KEYS
                                  if k in final and k in baseline_row}
    extras: list[ArtifactFile] = []
    try:
        from . import card

        extras += card.write_plots(ctx.history, teacher_row, step_rows, out_dir, v.task)
        extras.append(card.write_model_card(report, spec, teacher, v, out_dir, failed=outcome.message or None))
    except Exception as exc:  # noqa: BLE001 - the card and plots are extras; never fail a job over them
        reporter.event("report", f"model card / plots skipped: {_teachers.error_summary(exc)}", level="warning")
    write_artifact = write_report(report, out_dir)
    passed_steps = sorted(outcome.artifacts)
    if outcome.failed is None:
        artifacts = [a for i in passed_steps for a in outcome.artifacts[i]]
    else:
        artifacts = list(outcome.artifacts[passed_steps[-1]]) if passed_steps else []
    artifacts += extras + [write_artifact]
    student_metrics = {k: final[k] for k in METRIC_KEYS if k in final} if final_src is not None else {}
    teacher_out = {k: teacher_row[k] for k in METRIC_KEYS if k in teacher_row and k not in ("agreement",)}
    metrics: dict[str, Any] = {"teacher": teacher_out, "student": student_metrics}
    if baseline_row is not None:
        metrics["baseline"] = {k: baseline_row[k] for k in METRIC_KEYS if k in baseline_row}
        metrics["teacher_gain"] = report["teacher_gain"]
    result = EngineResult(artifacts=artifacts, metrics=metrics, report=report)
    if outcome.failed is not None:
        reporter.event("report", "report written (quality gate failed): " + outcome.message, level="error",
                       data=outcome.failed)
        raise QualityGateFailed(outcome.message, result)
    reporter.event(
        "report",
        f"report written: compression {_times(report['compression_ratio'])}, "
        f"speedup {_times(report['speedup'])}, " + _describe(final),
        data={"compression_ratio": report["compression_ratio"], "speedup": report["speedup"]},
    )
    return result


_ROW_KEYS = ("num_parameters", "nonzero_parameters", "size_bytes", "size_gzip_bytes", "latency_ms", *METRIC_KEYS)


def _teacher_extras(v: _Validated, source: TeacherSource) -> dict[str, Any]:
    """``nonzero_parameters`` and ``size_gzip_bytes`` of the teacher (gzip only below 256 MB)."""
    out: dict[str, Any] = {"format": v.teacher.format}
    try:
        if v.teacher.module is not None:
            out["nonzero_parameters"] = int(sum(int(torch.count_nonzero(p.detach()))
                                                for p in v.teacher.module.parameters())) or None
        else:
            out["nonzero_parameters"] = compress_mod.OrtModule(Path(source.path)).counts()[1]
    except Exception:  # noqa: BLE001
        out["nonzero_parameters"] = None
    path = Path(source.path)
    out["size_gzip_bytes"] = _gzip_size(path.read_bytes()) if path.is_file() and path.stat().st_size < (256 << 20) else None
    return out


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.1f}x"


def _describe(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS if k in metrics)
