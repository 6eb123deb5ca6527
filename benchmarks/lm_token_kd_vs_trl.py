"""Distillery's off-policy token-level KD against TRL's GKDTrainer, side by side in one process.

    .venv/bin/pip install -c /tmp/c.txt trl      # benchmark-only dependency; /tmp/c.txt holds `torch==2.13.0`
                                                 # so pip can never replace the pinned CPU torch
    .venv/bin/python -m benchmarks.lm_token_kd_vs_trl [--teacher-steps 500] [--epochs 3] [--top-k 32,full]
        [--threads 1] [--rounds 3] [--quick] [--no-trl] [--out /tmp/lm_token_kd_vs_trl.json]

Both sides get the same teacher, the same initial student, the same packed token blocks, batch size, epochs,
optimizer (torch AdamW, lr 1e-3, no weight decay, betas 0.9/0.999), constant schedule without warm-up, no gradient
clipping, float32, no gradient checkpointing, seed and torch thread count:

- teacher: a 4-layer Llama (tests/support/lm.py) trained here for ``--teacher-steps`` steps on the CPython docs;
- student: the teacher with every other layer, every tensor copied from it (Distillery
  ``{"derive": {"depth": 0.5, "width": 1.0}}``; for TRL the same :func:`engine.lm.students.derive_student` call,
  so both start from identical weights; the script checks both have the same parameter count). ``width`` is
  explicit: the spec's default ``width`` is 0.5, which also halves every MLP (``--width 0.5`` to measure that);
- data: the training documents, each followed by EOS, concatenated and cut into blocks of ``--seq-len`` tokens
  (Distillery's ``text`` records; TRL gets the same blocks, checked equal, as ``input_ids``/``labels``);
- loss: forward KL(teacher ‖ student) at T = 1 on every next-token position. Distillery: ``token_kd`` with
  ``divergence: forward_kl``, ``sft_weight: 0``, ``top_k`` K (one row per ``--top-k`` value, ``full`` = the whole
  vocabulary); TRL: ``GKDTrainer`` with ``lmbda=0`` (off-policy: never samples from the student) and ``beta=0``
  (its generalized JSD is then KL(teacher ‖ student)) over the full vocabulary.

Distillery runs the teacher once over the training blocks and caches its targets (``teacher_outputs``), then trains
from the cache; GKDTrainer runs the teacher on every batch of every epoch. Measured:

- train tokens/s: tokens processed (batch × seq-len per step, no padding in packed blocks) / seconds. Distillery's
  report counts its epoch loops only (``steps[0].data.train_tokens_per_second``: the teacher cache is filled
  before, the per-epoch held-out scoring after); the "+ cache" column adds the teacher pass that fills the cache,
  which is the like-for-like number against TRL, whose ``trainer.train()`` wall time includes its teacher.
- held-out perplexity of the teacher and of every student on the 12 held-out documents, one function for all
  (``tests.support.lm.perplexity``, blocks of ``--seq-len``). Distillery's student is read back from its ``hf``
  export. Distillery scores each epoch on a validation set (``--val-docs`` training documents, kept out of the
  KD data of both sides) and keeps the best epoch; TRL keeps the last.
- wall seconds: Distillery the whole ``engine.run`` (validation, teacher scoring, cache, training, per-epoch
  scoring, ``hf`` export and its verification, report with generation-speed timings); TRL building the
  ``GKDTrainer``, ``train()`` and ``save_model()``.

Each round runs Distillery (first k), TRL, Distillery (other k) back to back; every row is the median over
``--rounds`` rounds and each ratio the median of the per-round ratios, so that load from other processes falls on
both sides. One torch thread by default: with more threads than idle cores, OpenMP's barriers make a run many times
slower at random, which no number of rounds averages out. Results are printed and written as JSON to ``--out``
(every round included); nothing in docs/ is rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine import DatasetSource, TeacherSource, run
from engine.values import NullReporter
from tests.support import lm

DEPTH = 0.5  # the student keeps every other decoder layer
TRL_INSTALL = ".venv/bin/pip install -c /tmp/c.txt trl   (/tmp/c.txt: torch==2.13.0)"


class EventTimes(NullReporter):
    """Keeps the data and the seconds since the job started of each engine event."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.events: list[tuple[str, float, dict]] = []

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((type, time.perf_counter() - self.started, dict(data or {})))

    def first(self, type: str) -> dict:
        return next(d for t, _, d in self.events if t == type)


def parse_top_k(text: str) -> list[int | None]:
    return [None if k.strip().lower() in ("full", "none", "null") else int(k) for k in text.split(",") if k.strip()]


def load_hf_zip(path: Path, directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    with zipfile.ZipFile(path) as z:
        z.extractall(directory)
    return AutoModelForCausalLM.from_pretrained(directory).float().eval()


def distillery_side(top_k: int | None, args: argparse.Namespace, teacher_zip: Path, kd_jsonl: Path, val_jsonl: Path,
                    tok: Any, test_docs: list[str], work: Path) -> dict[str, Any]:
    spec = {"teacher_model_id": "t", "dataset_id": "ds", "eval_dataset_id": "val",
            "student": {"derive": {"depth": DEPTH, "width": args.width}},
            "steps": [{"kind": "distill",
                       "loss": {"type": "token_kd", "divergence": "forward_kl", "top_k": top_k, "sft_weight": 0.0},
                       "epochs": args.epochs, "batch_size": args.batch, "max_seq_len": args.seq_len,
                       "optimizer": {"type": "adamw", "lr": args.lr, "weight_decay": 0.0},
                       "schedule": {"type": "constant"}}],
            "exports": ["hf"], "seed": args.seed}
    out_dir = work / f"distillery-k{top_k or 'full'}"
    rep = EventTimes()
    started = time.perf_counter()
    result = run(spec, TeacherSource(teacher_zip, "hf_transformers", "causal_lm"),
                 {"ds": DatasetSource(kd_jsonl, "jsonl"), "val": DatasetSource(val_jsonl, "jsonl")}, out_dir, rep,
                 device="cpu", threads=args.threads)
    wall = time.perf_counter() - started
    step = result.report["steps"][0]
    data = step["data"]
    cache = rep.first("teacher_outputs")
    export = rep.first("export")
    export_s = next(t for ty, t, _ in rep.events if ty == "export") - next(
        t for ty, t, _ in rep.events if ty == "step_finished")
    hf = next(a for a in result.artifacts if a.kind == "student" and a.format == "hf")
    student = load_hf_zip(Path(hf.path), out_dir / "student")
    tokens = data["train_tokens_per_second"] * data["train_seconds"]
    return {"tool": f"Distillery token_kd top_k={top_k or 'full'}", "top_k": top_k,
            "train_tokens": round(tokens),
            "train_seconds": data["train_seconds"],
            "train_tokens_per_second": data["train_tokens_per_second"],
            "teacher_cache_seconds": cache["seconds"], "teacher_cache_bytes": cache["bytes"],
            "train_tokens_per_second_with_cache": tokens / (data["train_seconds"] + cache["seconds"]),
            "best_epoch": data["best_epoch"], "val_perplexity": step["perplexity"],
            "test_perplexity": lm.perplexity(student, tok, test_docs, seq_len=args.seq_len),
            "export_seconds_approx": export_s, "export": export.get("format"),
            "wall_seconds": wall, "threads_in_job": result.report["reproducibility"]["threads"],
            "student_parameters": result.report["architecture"]["parameters"]}


def trl_side(args: argparse.Namespace, teacher_dir: Path, blocks: torch.Tensor, tok: Any, test_docs: list[str],
             work: Path) -> dict[str, Any]:
    try:
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, TrainerCallback, default_data_collator
        try:  # trl >= 1.0 keeps GKD under trl.experimental
            from trl.experimental.gkd import GKDConfig, GKDTrainer
        except ImportError:
            from trl import GKDConfig, GKDTrainer
    except ImportError as exc:
        raise SystemExit(f"TRL side: cannot import TRL ({exc}). Install it with: {TRL_INSTALL}") from None
    from engine.lm.students import derive_student

    class Threads(TrainerCallback):
        seen: int | None = None

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Threads.seen = torch.get_num_threads()

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)
    student = derive_student(teacher, depth=DEPTH, width=args.width).float().train()
    rows = blocks.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})
    # TRL's SFTConfig (GKDConfig's base) defaults bf16=True and gradient checkpointing on: both off, as in Distillery.
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {f.name for f in dataclasses.fields(GKDConfig)}
    no_checkpointing = {name: False for name in ("activation_checkpointing", "gradient_checkpointing") if name in fields}
    config = GKDConfig(
        output_dir=str(work / "trl"), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
        per_device_train_batch_size=args.batch, num_train_epochs=args.epochs, max_length=args.seq_len,
        learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        bf16=False, fp16=False, use_cpu=True, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, **no_checkpointing)
    started = time.perf_counter()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tok, data_collator=default_data_collator, callbacks=[Threads()])
    torch.set_num_threads(args.threads)
    train_started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - train_started
    flag = next((f for f in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(trainer.model), f)),
                None)
    checkpointing = bool(getattr(trainer.model, flag)) if flag else None
    trainer.save_model(str(work / "trl" / "student"))
    wall = time.perf_counter() - started
    model = trainer.model.float().eval()
    tokens = int(blocks.shape[0]) * int(blocks.shape[1]) * args.epochs
    return {"tool": f"TRL {trl.__version__} GKDTrainer lmbda=0 beta=0", "top_k": None, "train_tokens": tokens,
            "train_seconds": train_seconds, "train_tokens_per_second": tokens / train_seconds,
            "train_tokens_per_second_with_cache": tokens / train_seconds,
            "trainer_train_runtime": output.metrics.get("train_runtime"), "train_loss": output.training_loss,
            "optimizer_steps": output.global_step,
            "test_perplexity": lm.perplexity(model, tok, test_docs, seq_len=args.seq_len),
            "wall_seconds": wall, "threads_in_job": Threads.seen,
            "student_parameters": sum(p.numel() for p in model.parameters()),
            "trl_config": {"bf16": config.bf16, "gradient_checkpointing": checkpointing, "optim": str(config.optim),
                           "lr_scheduler_type": str(config.lr_scheduler_type), "max_grad_norm": config.max_grad_norm}}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per tool: the median of each measure over the rounds; ratios against TRL are taken within each round
    (the two ran back to back, under the same machine load) and their median kept."""
    trl_runs = runs.get("trl", [])
    rows = []
    for key, rs in runs.items():
        row = {"tool": rs[0]["tool"], "top_k": rs[0]["top_k"], "rounds": len(rs)}
        for name in ("train_tokens_per_second", "train_tokens_per_second_with_cache", "train_seconds",
                     "test_perplexity", "wall_seconds", "teacher_cache_seconds", "val_perplexity"):
            if name in rs[0]:
                row[name] = statistics.median(r[name] for r in rs)
        if key != "trl" and trl_runs:
            pairs = list(zip(rs, trl_runs))
            row["ratio_vs_trl"] = statistics.median(
                r["train_tokens_per_second"] / t["train_tokens_per_second"] for r, t in pairs)
            row["ratio_with_cache_vs_trl"] = statistics.median(
                r["train_tokens_per_second_with_cache"] / t["train_tokens_per_second"] for r, t in pairs)
            row["wall_ratio_vs_trl"] = statistics.median(r["wall_seconds"] / t["wall_seconds"] for r, t in pairs)
        rows.append(row)
    return rows


def table(teacher_ppl: float, rows: list[dict[str, Any]]) -> str:
    head = (f"{'tool':42s} {'train tok/s':>11s} {'+ cache':>9s} {'/ TRL':>6s} {'+cache/TRL':>10s} "
            f"{'test ppl':>9s} {'wall s':>7s}")
    lines = [head, "-" * len(head), f"{'teacher (4 layers)':42s} {'':>11s} {'':>9s} {'':>6s} {'':>10s} "
             f"{teacher_ppl:9.3f} {'':>7s}"]
    for r in rows:
        ratio = f"{r['ratio_vs_trl']:6.2f}" if "ratio_vs_trl" in r else f"{'':>6s}"
        ratio_c = f"{r['ratio_with_cache_vs_trl']:10.2f}" if "ratio_with_cache_vs_trl" in r else f"{'':>10s}"
        lines.append(f"{r['tool']:42s} {r['train_tokens_per_second']:11.0f} "
                     f"{r['train_tokens_per_second_with_cache']:9.0f} {ratio} {ratio_c} "
                     f"{r['test_perplexity']:9.3f} {r['wall_seconds']:7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=500, help="teacher training steps (batch 16 x 64; "
                        "about 20 s on one idle core)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block (the models' context is 256)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-k", default="32,full", help="Distillery rows: comma-separated k values, 'full' = no top-k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; rows are medians over them")
    parser.add_argument("--width", type=float, default=1.0, help="derive width of the student's MLPs (both sides)")
    parser.add_argument("--val-docs", type=int, default=4, help="training documents kept for Distillery's epoch choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 teacher steps, 12 documents, 1 epoch, "
                        "blocks of 64, top_k 32 only, 1 round")
    parser.add_argument("--no-trl", action="store_true", help="the Distillery side only")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lm_token_kd_vs_trl.json")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental since trl 1.0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kd_limit = None
    if args.quick:
        args.teacher_steps, args.epochs, args.seq_len, args.top_k, args.rounds, kd_limit = 40, 1, 64, "32", 1, 12
    top_ks = parse_top_k(args.top_k)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    tok = lm.tokenizer()
    train_docs, test_docs = lm.split_documents()
    val_docs, kd_docs = train_docs[-args.val_docs:], train_docs[:-args.val_docs][:kd_limit]
    t = time.perf_counter()
    teacher = lm.train_teacher(tok, train_docs, steps=args.teacher_steps)
    teacher_seconds = time.perf_counter() - t
    teacher_ppl = lm.perplexity(teacher, tok, test_docs, seq_len=args.seq_len)
    print(f"teacher: {args.teacher_steps} steps in {teacher_seconds:.1f}s, held-out perplexity {teacher_ppl:.3f}",
          flush=True)

    runs: dict[str, list[dict[str, Any]]] = {}
    trl_error = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_dir = lm.save_model_dir(teacher, tok, work / "teacher")
        teacher_zip = lm.zip_dir(teacher_dir, work / "teacher.zip")
        kd_jsonl = lm.write_jsonl(work / "kd.jsonl", [{"text": d} for d in kd_docs])
        val_jsonl = lm.write_jsonl(work / "val.jsonl", [{"text": d} for d in val_docs])

        from engine.lm import text_data

        blocks = lm.blocks(tok, kd_docs, args.seq_len)
        engine_blocks = text_data.tokenize(tok, *text_data.read_records(kd_jsonl), args.seq_len).input_ids
        assert torch.equal(blocks, engine_blocks), "both sides must train on the same token blocks"
        print(f"data: {len(kd_docs)} documents -> {blocks.shape[0]} blocks of {args.seq_len} tokens; "
              f"{len(val_docs)} validation, {len(test_docs)} held-out documents", flush=True)

        # interleaved (Distillery, TRL, Distillery, ...) so that drifting machine load falls on both sides
        order: list[int | None | str] = [top_ks[0], "trl", *top_ks[1:]] if not args.no_trl else list(top_ks)
        for rnd in range(args.rounds):
            for item in order:
                if item == "trl" and trl_error:
                    continue
                run_dir = work / f"round{rnd}"
                if item == "trl":
                    try:
                        r = trl_side(args, teacher_dir, blocks, tok, test_docs, run_dir)
                    except SystemExit as exc:
                        trl_error = str(exc)
                    except Exception as exc:  # noqa: BLE001 - report TRL's failure, keep the Distillery rows
                        trl_error = f"TRL side failed: {type(exc).__name__}: {exc}"
                    if trl_error:
                        print(trl_error, flush=True)
                        continue
                else:
                    r = distillery_side(item, args, teacher_zip, kd_jsonl, val_jsonl, tok, test_docs, run_dir)
                runs.setdefault(str(item), []).append({"round": rnd, **r})
                print(f"round {rnd + 1}/{args.rounds} {r['tool']}: {r['train_tokens_per_second']:.0f} train tok/s "
                      f"({r['train_tokens_per_second_with_cache']:.0f} with the teacher pass), test perplexity "
                      f"{r['test_perplexity']:.3f}, wall {r['wall_seconds']:.1f}s", flush=True)

    rows = summarise(runs)
    sizes = {r["student_parameters"] for rs in runs.values() for r in rs}
    if len(sizes) > 1:
        print(f"WARNING: the students differ in size ({sorted(sizes)} parameters): not a like-for-like comparison")
    print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU {platform.processor() or platform.machine()}; "
          f"batch {args.batch} x {args.seq_len} tokens, {args.epochs} epochs of {blocks.shape[0]} blocks, AdamW lr "
          f"{args.lr}, constant; median of {args.rounds} interleaved round(s)")
    print(table(teacher_ppl, rows))
    print("train tok/s: Distillery's epoch loops (teacher cached beforehand); + cache: with the teacher pass that "
          "fills the cache; TRL runs its teacher inside the loop (both columns equal). Ratios: median of the "
          "per-round ratios.")
    if trl_error:
        print(f"TRL: {trl_error}")
    result = {"benchmark": "lm_token_kd_vs_trl", "versions": versions(), "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": {"kd_documents": len(kd_docs), "val_documents": len(val_docs), "test_documents": len(test_docs),
                       "blocks": int(blocks.shape[0]), "seq_len": args.seq_len, "vocab_size": len(tok)},
              "teacher": {"steps": args.teacher_steps, "train_seconds": teacher_seconds, "test_perplexity": teacher_ppl,
                          "parameters": sum(p.numel() for p in teacher.parameters())},
              "student_parameters": sorted(sizes), "rows": rows, "runs": runs, "trl_error": trl_error,
              "total_seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
