"""A whole ``engine.run`` job vs a plain PyTorch KD loop: where a small job's wall time goes.

    .venv/bin/python -m benchmarks.job_overhead [--rounds 5] [--threads 1] [--no-write]

Both sides get the same MNIST-like data (4,000 training / 445 held-out rows × 784 features, 10
classes, scikit-learn ``make_classification``), the same teacher (MLP 784→1024→1024→10, 37× the
student's multiply-accumulates), student (``mlp`` [64]), batch 128, AdamW, cosine schedule, KD T=4
α=0.9, 20 epochs, seed and torch threads. The engine side is the *whole* job - validation, teacher
scoring and caching, training, the report's measurements, every default export (TorchScript, ONNX,
safetensors) with its verification, plots, model card and ``report.json`` - timed around
``engine.run``; its phases come from the job's ``timings`` event. The plain side is the loop a
practitioner writes (the teacher runs on every batch; one held-out pass per epoch), timed around its
epochs (``benchmarks.run.plain_kd_loop``).

Rounds are paired and interleaved (engine, plain, engine, plain, ...) after one unmeasured job that
pays the process's one-off imports; the ratio is the median of the per-round ratios. One more job runs
in a fresh process (``--child``) to show what a process's start and imports cost. Each round also runs the
job as a worker does once it has claimed it (``worker.supervisor.supervise``: the sandboxed executor), in
the executor the worker started before the job (``worker/prestart.py``) and in a fresh one. Writes the
``overhead`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, FEATURES, CLASSES, HIDDEN, WIDTH, EPOCHS, BATCH, LR, SEED = 4445, 784, 10, 64, 1024, 20, 128, 3e-3, 0
GOAL = 0.4
#: Seconds a worker's next executor has to import before its job arrives (``service_job``).
PRESTART_HEADSTART = 6.0


def make_data(rows: int, features: int, classes: int, seed: int):
    """MNIST-like rows: ``features`` float32 columns (64 informative, well separated), 90% training / 10% held out."""
    import numpy as np
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=rows, n_features=features, n_informative=64, n_classes=classes,
                               n_clusters_per_class=2, class_sep=3.0, random_state=seed)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    cut = int(rows * 0.9)
    return x[:cut], y[:cut].astype(np.int64), x[cut:], y[cut:].astype(np.int64)


def job_spec(epochs: int) -> dict:
    """The job: default exports (TorchScript, ONNX, safetensors), no augmentation (teacher outputs cached)."""
    return {"teacher_model_id": "bench", "dataset_id": "bench",
            "student": {"family": "mlp", "hidden": [HIDDEN], "activation": "relu", "dropout": 0.0, "init": "random"},
            "steps": [{"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9}, "epochs": epochs,
                       "batch_size": BATCH, "optimizer": {"type": "adamw", "lr": LR, "weight_decay": 0.0},
                       "schedule": {"type": "cosine", "warmup_fraction": 0.0}}],
            "val_fraction": 0.1, "seed": SEED}


def engine_job(teacher_path: Path, npz: Path, epochs: int, threads: int, out: Path) -> tuple[float, dict, float]:
    """One ``engine.run``: (wall seconds, its ``timings`` event data, held-out accuracy)."""
    from engine import DatasetSource, TeacherSource, run
    from engine.values import NullReporter

    class Timings(NullReporter):
        data: dict = {}

        def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
            if type == "timings":
                self.data = dict(data or {})

    reporter = Timings()
    started = time.perf_counter()
    result = run(job_spec(epochs), TeacherSource(teacher_path, "torchscript"), DatasetSource(npz), out, reporter,
                 device="cpu", threads=threads)
    seconds = time.perf_counter() - started
    assert reporter.data == result.report["timings"], "the timings event and report.json disagree"
    return seconds, reporter.data, float(result.metrics["student"]["accuracy"])


class _NoCheckpoints:
    def restore(self, dst: Path) -> bool:
        return False

    def push(self, src: Path) -> None:
        pass


def service_job(teacher_path: Path, npz: Path, epochs: int, threads: int, data_dir: Path, name: str,
                prestarted: bool) -> float:
    """One job as a worker runs it once claimed: ``worker.supervisor.supervise`` stages it, runs it in the
    sandboxed executor (bubblewrap where it works) and validates what comes back. ``prestarted``: in the
    executor the worker started after its previous job (``worker/prestart.py``), given the few seconds a worker
    has between jobs to finish its imports; else in a fresh one. Returns the wall seconds of ``supervise``."""
    from app.settings import get_settings
    from engine import DatasetSource, TeacherSource
    from engine.values import NullReporter
    from worker import prestart, supervisor

    settings = get_settings().model_copy(update={"data_dir": data_dir, "worker_threads": threads,
                                                  "device": "cpu", "executor_prestart": prestarted})
    if prestarted:
        prestart.prepare(settings)
        time.sleep(PRESTART_HEADSTART)
    files = supervisor.JobFiles(job_spec(epochs), TeacherSource(teacher_path, "torchscript"),
                                {"bench": DatasetSource(npz)}, {})
    work = data_dir / "work" / name
    work.mkdir(parents=True)
    started = time.perf_counter()
    ending = supervisor.supervise(files, work, _NoCheckpoints(), settings, NullReporter(), lambda: False)
    seconds = time.perf_counter() - started
    assert isinstance(ending, supervisor.Finished) and ending.status == "succeeded", ending
    return seconds


def child(argv: list[str]) -> None:
    """``--child teacher.pt data.npz epochs threads``: one job in this fresh process; prints JSON."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(int(argv[3]))
    torch_import = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        seconds, timings, _ = engine_job(Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]), Path(tmp))
    print(json.dumps({"torch_import": torch_import, "seconds": seconds, "timings": timings}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (1: on a shared 2-core machine a second OpenMP thread "
                             "makes runs many times slower at random)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import numpy as np
    import torch

    from benchmarks.run import flops, make_teacher, plain_kd_loop
    from benchmarks.sections import write_section

    torch.set_num_threads(args.threads)
    x, y, x_val, y_val = make_data(ROWS, FEATURES, CLASSES, SEED)
    teacher = make_teacher(x, y, CLASSES, width=WIDTH, seed=SEED)
    cost_ratio = flops(teacher) / (FEATURES * HIDDEN + HIDDEN * CLASSES)
    rounds: list[tuple[float, float, dict]] = []
    service: list[tuple[float, float, float]] = []  # (prestarted executor, fresh executor, plain loop)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_path, npz = tmp / "teacher.pt", tmp / "data.npz"
        torch.jit.save(torch.jit.script(teacher), str(teacher_path))
        np.savez(npz, x=x, y=y, x_val=x_val, y_val=y_val)
        first, first_timings, _ = engine_job(teacher_path, npz, args.epochs, args.threads, tmp / "warmup")
        print(f"first job in this process (imports): {first:.2f}s", flush=True)
        for i in range(args.rounds):
            eng, timings, eng_acc = engine_job(teacher_path, npz, args.epochs, args.threads, tmp / f"job{i}")
            plain, plain_acc = plain_kd_loop(teacher, x, y, x_val, y_val, HIDDEN, CLASSES, args.epochs, BATCH, LR,
                                             SEED, 0.0)
            rounds.append((eng, plain, timings))
            warm = service_job(teacher_path, npz, args.epochs, args.threads, tmp / "data", f"warm{i}", True)
            cold = service_job(teacher_path, npz, args.epochs, args.threads, tmp / "data", f"cold{i}", False)
            service.append((warm, cold, plain))
            print(f"round {i}: engine job {eng:.2f}s (acc {eng_acc:.4f}) | plain loop {plain:.2f}s "
                  f"(acc {plain_acc:.4f}) | ratio {eng / plain:.2f} | sandboxed: prestarted executor {warm:.2f}s "
                  f"({warm / plain:.2f}), fresh executor {cold:.2f}s ({cold / plain:.2f})", flush=True)
        fresh = json.loads(subprocess.run(
            [sys.executable, "-m", "benchmarks.job_overhead", "--child", str(teacher_path), str(npz), str(args.epochs),
             str(args.threads)], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    ratios = [e / p for e, p, _ in rounds]
    ratio = statistics.median(ratios)
    eng_med = statistics.median(e for e, _, _ in rounds)
    plain_med = statistics.median(p for _, p, _ in rounds)
    phases = [k for k in rounds[0][2] if k != "total"]
    phase_med = {k: statistics.median(t.get(k, 0.0) for _, _, t in rounds) for k in phases}
    warm_ratio = statistics.median(w / p for w, _, p in service)
    cold_ratio = statistics.median(c / p for _, c, p in service)
    print(f"median ratio {ratio:.2f} (goal ≤ {GOAL}); fresh-process job {fresh['seconds']:.2f}s; sandboxed job "
          f"{warm_ratio:.2f} with the prestarted executor, {cold_ratio:.2f} with a fresh one")
    lines = [
        "## Whole job: `engine.run` vs a plain PyTorch KD loop",
        "",
        f"`python -m benchmarks.job_overhead --rounds {args.rounds} --threads {args.threads}`. Data: {len(x)} "
        f"training / {len(x_val)} held-out rows × {FEATURES} features (MNIST-like: scikit-learn "
        f"`make_classification`, 64 informative), {CLASSES} classes. Teacher: MLP {FEATURES}→{WIDTH}→{WIDTH}→{CLASSES} "
        f"({cost_ratio:.0f}× the student's multiply-accumulates). Student: `mlp` [{HIDDEN}]. {args.epochs} epochs, "
        f"batch {BATCH}, AdamW lr {LR}, cosine, KD T=4 α=0.9, {args.threads} torch thread(s), CPU "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}. The engine job is the whole "
        "job (default exports torchscript + onnx + safetensors, verified; plots; card; report); the plain loop is its "
        f"epochs. {args.rounds} paired, interleaved rounds after one unmeasured job; the ratio is the median of the "
        "per-round ratios.",
        "",
        "| round | engine job (s) | plain loop (s) | engine / plain |",
        "|---|---|---|---|",
        *[f"| {i} | {e:.2f} | {p:.2f} | {e / p:.2f} |" for i, (e, p, _) in enumerate(rounds)],
        f"| **median** | {eng_med:.2f} | {plain_med:.2f} | **{ratio:.2f}** (goal ≤ {GOAL}) |",
        "",
        "Where the engine job's time goes (median seconds per phase over the rounds, from its `timings` event; "
        "`hashes` and `plots` run on background threads and are not on the job's critical path, "
        "`background_wait` is what the job waited for them; the first job in a process and a job in a fresh "
        "process pay one-off imports on top):",
        "",
        "| phase | median (s) | first job in the process (s) | fresh process (s) |",
        "|---|---|---|---|",
        *[f"| {k} | {phase_med[k]:.3f} | {first_timings.get(k, 0.0):.3f} | {fresh['timings'].get(k, 0.0):.3f} |"
          for k in phases],
        f"| **total** | {statistics.median(t['total'] for _, _, t in rounds):.3f} | {first_timings['total']:.3f} | "
        f"{fresh['timings']['total']:.3f} |",
        "",
        f"- A fresh process also imports torch ({fresh['torch_import']:.2f}s here, before `engine.run`), and inside "
        "the job `torch._dynamo` (about 1 s, imported by `torch.optim`'s first optimizer, in `train`), `onnx` with "
        "`ml_dtypes` (about 0.6 s, imported by `torch.onnx.export`, in `export`) and matplotlib (in `plots`).",
        "",
        "### The same job in the sandboxed executor, as a worker runs it",
        "",
        "Timed around `worker.supervisor.supervise` (staging, the executor in its sandboxed process, every message "
        "and file it returns validated) in the same rounds, against the same plain loop. A worker starts its next "
        f"job's executor right after a job ends (`worker/prestart.py`); here it gets {PRESTART_HEADSTART:g} s to "
        "finish its imports before the job arrives. `DISTILLERY_EXECUTOR_PRESTART=false` gives every job a fresh "
        "executor.",
        "",
        "| round | prestarted executor (s) | fresh executor (s) | plain loop (s) | prestarted / plain | fresh / plain |",
        "|---|---|---|---|---|---|",
        *[f"| {i} | {w:.2f} | {c:.2f} | {p:.2f} | {w / p:.2f} | {c / p:.2f} |" for i, (w, c, p) in enumerate(service)],
        f"| **median** | {statistics.median(w for w, _, _ in service):.2f} | "
        f"{statistics.median(c for _, c, _ in service):.2f} | {statistics.median(p for _, _, p in service):.2f} | "
        f"**{warm_ratio:.2f}** (goal ≤ {GOAL}) | {cold_ratio:.2f} |",
        "",
    ]
    if not args.no_write:
        write_section(args.output, "overhead", "\n".join(lines))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
