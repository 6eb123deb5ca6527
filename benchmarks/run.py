"""Distillery engine vs a hand-written PyTorch KD loop, side by side in one process.

    make bench            # both benchmarks (python -m benchmarks)
    .venv/bin/python -m benchmarks.run [--epochs 20] [--threads 2]     # this one alone

For each scenario both sides get the same data, teacher, student architecture, batch size,
optimizer, epochs, seed and torch thread count. Training time is measured around the training
only: for the engine, from its ``step_started`` to its ``step_finished`` event (teacher-output
caching included); for the plain loop, its epoch loop (teacher forward on every batch, as
written in tutorials). Results are written to the ``distill`` section of ``docs/benchmarks.md``.

Scenarios:
- ``cached``: no augmentation. The engine runs the teacher once per example and reuses its
  outputs every epoch; the plain loop runs it on every batch.
- ``augmented``: Gaussian input noise, so the teacher must see every augmented batch and caching
  cannot apply; measures the engine's per-step overhead.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.sections import write_section
from engine import DatasetSource
from engine import TeacherSource
from engine import run
from engine.values import NullReporter

ROOT = Path(__file__).resolve().parents[1]


class TimingReporter(NullReporter):
    """Records when the engine's training step starts and ends."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        if type in ("step_started", "step_finished"):
            self.marks[type] = time.perf_counter()


def make_data(rows: int, features: int, classes: int, seed: int):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=rows, n_features=features, n_informative=features // 2, n_classes=classes,
                               n_clusters_per_class=2, class_sep=1.5, random_state=seed)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    cut = int(rows * 0.9)
    return x[:cut], y[:cut].astype(np.int64), x[cut:], y[cut:].astype(np.int64)


def make_teacher(x, y, classes: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(x.shape[1], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                            nn.Linear(width, classes))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(4):
        for idx in torch.randperm(len(xt)).split(256):
            opt.zero_grad()
            F.cross_entropy(teacher(xt[idx]), yt[idx]).backward()
            opt.step()
    return teacher.eval()


def flops(model: nn.Module) -> int:
    """Multiply-accumulates per example of an MLP (the cost ratio the goal is stated in)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def plain_kd_loop(teacher: nn.Module, x, y, x_val, y_val, hidden: int, classes: int, epochs: int, batch: int,
                  lr: float, seed: int, noise: float) -> tuple[float, float]:
    """The loop a practitioner writes: teacher forward on every batch. Returns (seconds, val accuracy)."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, classes))
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    T, alpha = 4.0, 0.9
    started = time.perf_counter()
    for _ in range(epochs):
        student.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            xb = xt[idx]
            if noise:
                xb = xb + noise * torch.randn(xb.shape, generator=gen)
            with torch.no_grad():
                t = teacher(xb)
            s = student(xb)
            loss = alpha * T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                                            reduction="batchmean") + (1 - alpha) * F.cross_entropy(s, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        student.eval()
        with torch.no_grad():  # a fair loop also evaluates once per epoch
            student(torch.from_numpy(x_val)).argmax(1)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        acc = float((student(torch.from_numpy(x_val)).argmax(1).numpy() == y_val).mean())
    return seconds, acc


def engine_run(teacher_path: Path, npz: Path, hidden: int, epochs: int, batch: int, lr: float, seed: int,
               noise: float, threads: int, out: Path) -> tuple[float, float]:
    spec = {"teacher_model_id": "bench", "dataset_id": "bench",
            "student": {"family": "mlp", "hidden": [hidden], "activation": "relu", "dropout": 0.0, "init": "random"},
            "steps": [{"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9}, "hints": [],
                       "epochs": epochs, "batch_size": batch,
                       "optimizer": {"type": "adamw", "lr": lr, "weight_decay": 0.0, "momentum": 0.9},
                       "schedule": {"type": "cosine", "warmup_fraction": 0.0}, "grad_clip": None,
                       "early_stopping": None, "augment": {"flip": False, "shift": 0, "noise": noise, "mixup": 0.0}
                       if noise else None, "dataset_id": None, "synthesize": None, "coreset": None}],
            "baseline": False, "val_fraction": 0.1, "exports": [], "seed": seed, "metadata": {}}
    rep = TimingReporter()
    result = run(spec, TeacherSource(teacher_path, "torchscript"), DatasetSource(npz), out, rep, device="cpu",
                 threads=threads)
    return rep.marks["step_finished"] - rep.marks["step_started"], float(result.metrics["student"]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes, hidden, batch, lr, seed = 10, 32, 128, 3e-3, 0
    x, y, x_val, y_val = make_data(args.rows, 64, classes, seed)
    teacher = make_teacher(x, y, classes, width=1024, seed=seed)
    student_macs = 64 * hidden + hidden * classes
    cost_ratio = flops(teacher) / student_macs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_path = tmp / "teacher.pt"
        torch.jit.save(torch.jit.script(teacher), str(teacher_path))
        npz = tmp / "data.npz"
        np.savez(npz, x=x, y=y, x_val=x_val, y_val=y_val)
        for name, noise in (("cached", 0.0), ("augmented", 0.05)):
            plain = min((plain_kd_loop(teacher, x, y, x_val, y_val, hidden, classes, args.epochs, batch, lr, seed,
                                       noise) for _ in range(args.repeats)), key=lambda r: r[0])
            eng = min((engine_run(teacher_path, npz, hidden, args.epochs, batch, lr, seed, noise, args.threads,
                                  tmp / f"out-{name}-{i}") for i in range(args.repeats)), key=lambda r: r[0])
            rows.append((name, plain, eng))
            print(f"{name:10s} plain {plain[0]:7.2f}s acc {plain[1]:.4f} | engine {eng[0]:7.2f}s acc {eng[1]:.4f} | "
                  f"ratio {eng[0] / plain[0]:.2f}", flush=True)
    lines = [
        "## Training loop: engine vs a plain PyTorch KD loop",
        "",
        f"Data: {len(x)} training / {len(x_val)} held-out rows × 64 features, {classes} classes "
        f"(scikit-learn `make_classification`). Teacher: MLP 64→1024→1024→{classes} "
        f"({cost_ratio:.0f}× the student's multiply-accumulates). Student: `mlp` [{hidden}]. "
        f"{args.epochs} epochs, batch {batch}, AdamW lr {lr}, cosine schedule, KD T=4 α=0.9, "
        f"{args.threads} torch threads, CPU ({platform.processor() or platform.machine()}), best of {args.repeats}.",
        "",
        "| scenario | plain loop (s) | plain acc | engine (s) | engine acc | engine / plain | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, plain, eng in rows:
        goal = "≤ 0.6" if name == "cached" else "≤ 1.1"
        lines.append(f"| {name} | {plain[0]:.2f} | {plain[1]:.4f} | {eng[0]:.2f} | {eng[1]:.4f} | "
                     f"{eng[0] / plain[0]:.2f} | {goal} |")
    lines += ["", "- `cached`: no augmentation; the engine computes teacher outputs once and reuses them every "
                  "epoch (time includes that pass).",
              "- `augmented`: Gaussian input noise (σ=0.05); the teacher runs on every augmented batch on both "
                  "sides, so this measures the engine's own overhead.", ""]
    write_section(args.output, "distill", "\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
