"""Data-parallel training of a causal LM student over ``devices`` processes (a job's ``"devices": N``).

:func:`fit_lm_ddp` has :func:`engine.lm.training.fit_lm`'s contract: it trains ``ctx.student`` in place on
:class:`~engine.lm.text_data.TokenBlocks` for the step's epochs, reports the same metrics, history rows and
progress, restores the best held-out epoch, and returns the same info dict. The work runs in ``devices``
processes (one GPU each with NCCL on CUDA, gloo on the CPU) under
:class:`torch.nn.parallel.DistributedDataParallel`: every rank holds a replica, computes the gradient of its
share of each global batch, and DDP averages the gradients with an all-reduce during the backward pass, so every
replica takes the same optimizer step (Li et al. 2020).

What crosses the process boundary, and how (no pickle for models or data: a rank only parses safetensors, ``.npy``
headers and JSON):

* the student: ``save_pretrained`` (config + ``model.safetensors``) into a folder under ``ctx.work_dir``; ranks
  load it with ``from_pretrained(..., use_safetensors=True)``; the teacher too, only for batches it must score
  live (on-policy, or no cache);
* the token blocks, the held-out blocks, the teacher's held-out logits and the cached teacher targets: ``.npy``
  files that ranks memory-map read-only (a memory-mapped :class:`~engine.lm.divergence.TeacherCache` is used
  in place, not copied); each epoch's batch order, drawn from ``ctx.generator`` exactly as ``fit_lm`` draws it,
  so one process and N processes see the same global batches;
* the step and scalars: ``job.json``; rendezvous: a file store in the same folder (no port, no network);
* back to the parent: small dicts on a multiprocessing queue (rank 0's per-epoch scores, the info dict, a rank's
  error) and rank 0's final weights as safetensors, loaded into ``ctx.student``. The reporter stays in the parent.

The parent polls ``ctx.reporter.should_stop()`` while it waits: a cancel terminates the ranks and raises
:class:`~engine.errors.Cancelled`. A rank's :class:`~engine.errors.EngineError` (e.g. ``TrainingDiverged``) is
raised again in the parent with its class; any other failure of a rank (an exception, a signal) raises
:class:`RankFailed` naming the rank and the cause, which the executor reports like any unexpected exception of
``fit_lm``.

Reference: S. Li, Y. Zhao, R. Varma, O. Salpekar, P. Noordhuis, T. Li, A. Paszke, J. Smith, B. Vaughan,
P. Damania, S. Chintala, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020
(arXiv:2006.15704): DDP's gradient bucketing, all-reduce overlapped with the backward pass, ``no_sync`` for
gradient accumulation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import queue as queue_module
import shutil
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ERROR_CODES, Cancelled, EngineError, TrainingDiverged, Unsupported
from engine.lm import divergence
from engine.lm.text_data import TokenBlocks
from engine.lm.training import EVAL_BATCH, LMContext, batch_loss, batches, evaluate
from engine.registry import losses, optimizers
from engine.training.optim import Scheduler
from jobspec import DistillStep

#: Seconds between the parent's looks at the queue, the ranks and ``should_stop`` (the supervisor checks every 0.5 s).
POLL_SECONDS = 0.25
#: Seconds a terminated rank gets to exit before it is killed.
TERMINATE_SECONDS = 10.0
#: Seconds the parent waits for a dead rank's error message still in flight.
DRAIN_SECONDS = 1.0


class RankFailed(RuntimeError):
    """A rank died of something other than an engine error (a defect, a signal): in one process this exception
    would have escaped ``fit_lm`` unchanged, so it is not dressed up as a user-actionable engine code."""


def fit_lm_ddp(ctx: LMContext, step: DistillStep, index: int, data: TokenBlocks, *,
               cache: divergence.TeacherCache | None, val_teacher: list[torch.Tensor] | None, devices: int,
               baseline: bool = False) -> dict[str, Any]:
    """Train ``ctx.student`` on ``data`` as :func:`~engine.lm.training.fit_lm` does, split over ``devices``
    processes; returns fit_lm's info dict (epochs, best_epoch, train_tokens_per_second, train_seconds,
    on_policy_batches)."""
    cuda = ctx.device.type == "cuda"
    if devices < 1 or (cuda and devices > torch.cuda.device_count()):
        raise Unsupported(f"devices {devices}: data-parallel training needs 1 to {torch.cuda.device_count()} GPUs here"
                          if cuda else f"devices {devices}: data-parallel training needs at least 1 process")
    kind = "baseline" if baseline else "distill"
    batch = min(step.batch_size, data.n)
    Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"ddp-step{index}-", dir=ctx.work_dir))
    procs: list[Any] = []
    try:
        # The teacher on every rank for targets computed live (on-policy batches, no cache); on rank 0 for the
        # held-out scores when its logits were not kept (fit_lm then runs it at each scoring too).
        live_teacher = not baseline and (cache is None or step.on_policy > 0)
        eval_teacher = val_teacher is None and ctx.teacher is not None
        job = {"step": step.model_dump(mode="json"), "index": index, "baseline": baseline, "batch": batch,
               "cuda": cuda, "threads": max(1, torch.get_num_threads() // devices), "seed": torch.initial_seed() % 2**62,
               "eos_id": ctx.eos_id, "pad_id": ctx.pad_id, "teacher": live_teacher, "eval_teacher": eval_teacher,
               "val_teacher": val_teacher is not None}
        job |= _write_inputs(folder, ctx, step, data, cache, val_teacher, batch, live_teacher or eval_teacher)
        (folder / "job.json").write_text(json.dumps(job))
        mp = torch.multiprocessing.get_context("spawn")
        results = mp.Queue()
        procs = [mp.Process(target=_rank_main, args=(r, devices, str(folder), results), name=f"distillery-ddp-rank{r}",
                            daemon=True) for r in range(devices)]
        ctx.progress.step_started(step_index=index, step_kind=kind, epochs=step.epochs)
        for p in procs:
            p.start()
        info = _wait(ctx, step, index, kind, procs, results)
        for p in procs:
            p.join(TERMINATE_SECONDS)
        _load_weights(ctx.student, folder / "final")
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)
    ctx.student.eval()
    return info


# ---- the parent -----------------------------------------------------------------------------------------------------
def _write_inputs(folder: Path, ctx: LMContext, step: DistillStep, data: TokenBlocks,
                  cache: divergence.TeacherCache | None, val_teacher: list[torch.Tensor] | None, batch: int,
                  teacher: bool) -> dict[str, Any]:
    """Write what the ranks read; returns job.json's entries about it (dtypes, the cache's files)."""
    out: dict[str, Any] = {"dtype": _dtype_name(ctx.student), "cache": None}
    ctx.student.save_pretrained(folder / "student")
    if teacher:
        ctx.teacher.save_pretrained(folder / "teacher")
        out["teacher_dtype"] = _dtype_name(ctx.teacher)
    for prefix, blocks in (("train", data), ("val", ctx.val)):
        for name in ("input_ids", "attention_mask", "target_mask"):
            np.save(folder / f"{prefix}_{name}.npy", getattr(blocks, name).cpu().numpy())
    # The same draws from ctx.generator as fit_lm's batches, epoch by epoch: same batches, and the generator is
    # left where fit_lm leaves it (the baseline twin's steps draw from it next).
    orders = [torch.cat(batches(data.n, batch, ctx.generator)) for _ in range(step.epochs)]
    np.save(folder / "orders.npy", torch.stack(orders).numpy())
    if val_teacher is not None:
        np.save(folder / "val_teacher.npy", torch.cat([t.float().cpu() for t in val_teacher]).numpy())
    if cache is not None:
        if not cache.complete:
            raise ValueError("the teacher cache holds no targets for some training sequences")
        out["cache"] = {}
        for name in ("logprobs", "indices"):
            arr = getattr(cache, name)
            if isinstance(arr, np.memmap):  # already an .npy file on disk: the ranks map it, no copy
                arr.flush()
                out["cache"][name] = str(arr.filename)
            elif arr is not None:
                np.save(folder / f"cache_{name}.npy", arr)
                out["cache"][name] = str(folder / f"cache_{name}.npy")
    return out


def _dtype_name(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _wait(ctx: LMContext, step: DistillStep, index: int, kind: str, procs: list[Any], results: Any) -> dict[str, Any]:
    """Relay rank 0's epochs to the reporter until its final message; cancel or fail on the way."""
    prefix = "baseline_" if kind == "baseline" else ""
    while True:
        if ctx.reporter.should_stop():
            raise Cancelled(f"cancelled in step {index} (data-parallel training)")
        # Exit codes taken before the read: a rank's messages are in the pipe before it exits, so a rank seen
        # exited here and an empty read below mean it has nothing more to say.
        exits = [p.exitcode for p in procs]
        try:
            msg = results.get(timeout=POLL_SECONDS)
        except queue_module.Empty:
            if any(code not in (None, 0) for code in exits) or all(code == 0 for code in exits):
                raise _death(results, exits) from None
            continue
        if msg["type"] == "error":
            raise _error(msg)
        if msg["type"] == "done":
            return msg["info"]
        # One epoch of rank 0, reported as fit_lm reports it.
        epoch, scores, loss = msg["epoch"], msg["scores"], msg["train_loss"]
        for name in ("perplexity", "agreement", "kl"):
            if name in scores:
                ctx.reporter.metric(step=index, epoch=epoch, name=prefix + name, value=float(scores[name]))
        ctx.reporter.metric(step=index, epoch=epoch, name=prefix + "train_loss", value=loss)
        ctx.history.append({"step": index, "epoch": epoch, "kind": kind, "train_loss": loss,
                            **{k: v for k, v in scores.items() if k != "tokens"}})
        ctx.progress.epoch_done(step_index=index, step_kind=kind, epoch=epoch, epochs=step.epochs,
                                seconds=msg["seconds"])


def _error(msg: dict[str, Any]) -> BaseException:
    text = f"data-parallel rank {msg['rank']}: {msg['message']}"
    if msg["code"] in ERROR_CODES:
        return EngineError.of(msg["code"], text)
    if msg["code"] == "memory":  # what the executor reports as resource_limit, as it would for one process
        return MemoryError(text)
    return RankFailed(f"{text}\n{msg['traceback']}")


def _death(results: Any, exits: list[int | None]) -> BaseException:
    """The error of a rank that exited: its own message if it sent one (another rank's may come first), else its
    exit status or signal."""
    with contextlib.suppress(queue_module.Empty):
        while True:
            msg = results.get(timeout=DRAIN_SECONDS)
            if msg["type"] == "error":
                return _error(msg)
    for rank, code in enumerate(exits):
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return RankFailed(f"data-parallel rank {rank} was killed by {name}{hint}")
        if code:
            return RankFailed(f"data-parallel rank {rank} exited with status {code} without reporting an error")
    return RankFailed("the data-parallel ranks exited without rank 0's result")


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + TERMINATE_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _load_weights(student: Any, directory: Path) -> None:
    from transformers import AutoModelForCausalLM

    # from_pretrained resolves tied weights (save_pretrained writes a tied tensor once); load_state_dict then copies
    # every tensor into the caller's student, on its device and dtype.
    dtype = next(student.parameters()).dtype
    trained = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=True, dtype=dtype)
    student.load_state_dict(trained.state_dict())


# ---- a rank -------------------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, folder: str, results: Any) -> None:
    """A rank's entry point: train, and turn any failure into a message for the parent and a non-zero exit."""
    import torch.distributed as dist

    try:
        job = json.loads((Path(folder) / "job.json").read_text())
        torch.set_num_threads(job["threads"])
        if not job["cuda"] and "lo" in dict(socket.if_nameindex()).values():
            # All ranks share this host: gloo's pairs go over loopback, whatever the hostname resolves to (a
            # sandbox without a network may not resolve it at all).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if job["cuda"]:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if job["cuda"] else "gloo", init_method=f"file://{folder}/rendezvous",
                                rank=rank, world_size=world)
        try:
            info = _train(rank, world, Path(folder), job, results)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            results.put({"type": "done", "info": info})
    except BaseException as exc:  # noqa: BLE001 - every ending goes to the parent
        code = exc.code if isinstance(exc, EngineError) else "memory" if isinstance(exc, MemoryError) else "internal_error"
        message = exc.message if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        results.put({"type": "error", "rank": rank, "code": code, "message": message[:2000],
                     "traceback": traceback.format_exc()[-4000:]})
        results.close()
        results.join_thread()  # the message is in the pipe before the parent sees this process exit
        os._exit(1)


def _npy(folder: Path, name: str) -> np.ndarray:
    return _mapped(folder / f"{name}.npy")


def _mapped(path: Path | str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _blocks(folder: Path, prefix: str) -> TokenBlocks:
    return TokenBlocks(*(torch.from_numpy(np.array(_npy(folder, f"{prefix}_{name}")))
                         for name in ("input_ids", "attention_mask", "target_mask")))


def _val_teacher(folder: Path) -> list[torch.Tensor]:
    """The teacher's held-out logits, one tensor per evaluation batch as :func:`evaluate` reads them."""
    logits = _npy(folder, "val_teacher")
    return [torch.from_numpy(np.array(logits[i:i + EVAL_BATCH])) for i in range(0, len(logits), EVAL_BATCH)]


class _MappedTargets:
    """:meth:`TeacherCache.get` over the cache's arrays, memory-mapped read-only from the parent's files."""

    def __init__(self, files: dict[str, str]):
        self.logprobs = _mapped(files["logprobs"])
        self.indices = _mapped(files["indices"]) if "indices" in files else None

    def get(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor | divergence.TopK:
        r = rows.numpy()
        lp = torch.from_numpy(np.asarray(self.logprobs[r], dtype=np.float32))
        if self.indices is None:
            return lp.to(device)
        return divergence.TopK(lp, torch.from_numpy(np.asarray(self.indices[r], dtype=np.int64))).to(device)


def _model(directory: Path, dtype: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                dtype=getattr(torch, dtype)).to(device)


def _train(rank: int, world: int, folder: Path, job: dict[str, Any], results: Any) -> dict[str, Any] | None:
    """fit_lm's loop on this rank's share of every global batch; rank 0 also scores, keeps the best epoch and
    writes the final weights. Returns the info dict on rank 0."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers.utils import logging as hf_logging

    import engine.lm.components  # noqa: F401  (registers the token_kd loss)

    hf_logging.disable_progress_bar()  # N ranks' bars on the executor's stderr say nothing the parent's events do not

    step, index, baseline = DistillStep.model_validate(job["step"]), job["index"], job["baseline"]
    dev = torch.device("cuda", rank) if job["cuda"] else torch.device("cpu")
    torch.manual_seed(job["seed"] + rank)  # on-policy sampling (and dropout) differ across ranks, reproducibly
    model = _model(folder / "student", job["dtype"], dev).train()
    teacher = None
    if job["teacher"] or (rank == 0 and job["eval_teacher"]):
        teacher = _model(folder / "teacher", job["teacher_dtype"], dev).eval().requires_grad_(False)
    if step.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # Not the reentrant variant: it reruns each block's forward inside the backward, which fires DDP's gradient
        # hooks a second time for the same parameters ("marked ready only once").
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # No buffer broadcast before each forward: the buffers (rotary frequencies) are constants, equal on every rank.
    ddp = DistributedDataParallel(model, device_ids=[rank] if job["cuda"] else None, forward_sync_buffers=False)
    data, cache = _blocks(folder, "train"), _MappedTargets(job["cache"]) if job["cache"] else None
    val = _blocks(folder, "val") if rank == 0 else None
    val_teacher = _val_teacher(folder) if rank == 0 and job["val_teacher"] else None
    orders, batch = torch.from_numpy(np.array(_npy(folder, "orders"))), job["batch"]
    kd = losses.build(step.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizers.build(step.optimizer).create(params)
    per_epoch = math.ceil(data.n / batch)
    sched = Scheduler(optimizer, step.schedule, math.ceil(per_epoch / step.grad_accumulation) * step.epochs)
    best: tuple[float, int, Any] = (math.inf, 0, None)
    tokens_seen, train_seconds, sampled = 0.0, 0.0, 0
    coin = torch.Generator().manual_seed(1000 + index)  # fit_lm's stream: every rank draws the same coins
    for epoch in range(1, step.epochs + 1):
        started = time.perf_counter()
        total, count = 0.0, 0.0
        epoch_batches = [orders[epoch - 1][rows] for rows in batches(data.n, batch)]
        for bi, rows in enumerate(epoch_batches):
            share = torch.tensor_split(rows, world)[rank]
            # A rank whose share is empty (a last batch smaller than the world) still runs forward and backward on
            # one row with weight 0: DDP's all-reduce needs every rank's gradient.
            weight = 1.0 if len(share) else 0.0
            live = not baseline and step.on_policy > 0 and float(torch.rand((), generator=coin)) < step.on_policy
            sync = (bi + 1) % step.grad_accumulation == 0 or bi + 1 == len(epoch_batches)
            with contextlib.nullcontext() if sync else ddp.no_sync():  # accumulate locally, all-reduce once
                loss, mask, att = batch_loss(ddp, teacher, kd, data, share if len(share) else rows[:1], cache, dev,
                                             live=live, baseline=baseline, eos_id=job["eos_id"], pad_id=job["pad_id"])
                # Each rank's loss is the sum over its tokens divided by the global batch's token count, times the
                # world size: DDP averages (sums, then divides by the world size) the ranks' gradients, so the
                # update is the gradient of the global batch's mean token loss, as in one process. A per-rank mean
                # would weigh a rank's tokens by 1 / (its own count), wrong whenever shares hold unequal numbers
                # of target tokens (padding, prompts, on-policy lengths, a short last batch).
                local = weight * float(mask.sum())
                stats = torch.tensor([local, float(loss.detach()) * local if local else 0.0, weight * float(att.sum())],
                                     dtype=torch.float64, device=dev)
                dist.all_reduce(stats)  # also tells every rank at once whether the global loss is finite
                tokens, loss_sum = float(stats[0]), float(stats[1])
                if not math.isfinite(loss_sum):
                    raise TrainingDiverged(f"step {index}, epoch {epoch}: the loss became {loss_sum / max(1.0, tokens)};"
                                           f" lower the learning rate (now {step.optimizer.lr}) or set grad_clip")
                scale = local * world / max(1.0, tokens) / step.grad_accumulation
                (loss * scale).backward()
            sampled += int(live)
            if sync:
                if step.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, step.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sched.step()
            total, count, tokens_seen = total + loss_sum, count + tokens, tokens_seen + float(stats[2])
        train_seconds += time.perf_counter() - started
        if rank == 0:
            scores = evaluate(model, val, dev, teacher=teacher if val_teacher is None else None,
                              teacher_logits=val_teacher)
            if scores["nll"] < best[0]:
                best = (scores["nll"], epoch, copy.deepcopy(model.state_dict()) if epoch < step.epochs else None)
            results.put({"type": "epoch", "epoch": epoch, "scores": scores, "train_loss": total / max(1.0, count),
                         "seconds": time.perf_counter() - started})
    if rank != 0:
        return None
    if best[2] is not None:  # a later epoch was worse on held-out text: ship the best one
        model.load_state_dict(best[2])
    if step.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.save_pretrained(folder / "final")
    return {"epochs": step.epochs, "best_epoch": best[1], "train_tokens_per_second":
            tokens_seen / train_seconds if train_seconds else None, "train_seconds": train_seconds,
            "on_policy_batches": sampled}
