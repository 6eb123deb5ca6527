"""Phase 2, ``load``: the job's data plan - held-out rows, each step's training rows, teacher caches.

:class:`DataPlan` picks the held-out rows (``eval_dataset_id``, else ``x_val`` / a seeded split of
the job's dataset, else a slice of synthetic data), caches the teacher's outputs on them, and
builds each step's :class:`StepData` on demand (dataset choice, coreset, data-free synthesis,
teacher-output cache), memoised per step and hint-feature set.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.split import split_dataset
from engine.report.timings import phase
from engine.training.plan import TrainingPlan
from engine.training.tables import StepData, Table, TeacherCache
from engine.values import Reporter
from engine.pipeline.validate import Validated, step_dataset_id

#: Share of synthetic samples held out when a data-free job has no eval dataset.
SYNTHETIC_VAL_FRACTION = 0.1


def _labels_tensor(y: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if y is None else torch.from_numpy(np.ascontiguousarray(y)).to(device)


class DataPlan:
    """Owns held-out data and builds each step's training data on demand (cached per dataset)."""

    def __init__(self, v: Validated, reporter: Reporter, out_dir: Path):
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
                (d for d in (step_dataset_id(job, s) for s in job.steps) if d), None)
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
        with phase("teacher_scoring"):  # the job's phase timings (engine.report.timings)
            self.t_val = TeacherCache.build(v.teacher, self.val, (), device=dev, cache_dir=None,
                                            should_stop=reporter.should_stop).all_outputs()
        self.teacher_seconds = time.perf_counter() - started

    # -- synthesis ---------------------------------------------------------------------------
    def _synthesize(self, step: Any, index: int) -> torch.Tensor:
        from engine.compression import datafree

        v = self.v
        cfg = step.synthesize
        shape = v.job.input_spec  # the spec guarantees it for synthesize steps
        assert shape is not None
        self.reporter.event("synthesize", f"step {index}: training a generator against the teacher "
                            f"({cfg.generator_epochs} epochs) for {cfg.num_samples} synthetic samples",
                            data={"step": index, "num_samples": cfg.num_samples, "generator_epochs": cfg.generator_epochs})
        started = time.perf_counter()

        def on_epoch(epoch: int, metrics: Mapping[str, float] | None = None, *args: Any) -> None:
            for k, val in (metrics or {}).items():
                if isinstance(val, (int, float)):
                    self.reporter.metric(step=index, epoch=int(epoch), name=f"generator_{k}", value=float(val))

        samples = datafree.synthesize(
            v.teacher.module, tuple(shape.shape), tuple(shape.range), v.out_dim, cfg.model_dump(),
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
            with phase("cache"):  # the job's phase timings (engine.report.timings)
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

    def step_data(self, step: TrainingPlan, index: int, features: Sequence[str]) -> StepData:
        key = (index, tuple(features))
        if key not in self.step_memo:
            self.step_memo[key] = self._step_data(step, index, features)
        return self.step_memo[key]

    def _step_data(self, step: TrainingPlan, index: int, features: Sequence[str]) -> StepData:
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
        ds_id = step_dataset_id(v.job, step)
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
