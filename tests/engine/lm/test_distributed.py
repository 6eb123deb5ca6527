"""Data-parallel LM training (engine/lm/distributed.py): two gloo processes on the CPU train the same student as
fit_lm in one process (same seed, same global batches), and a cancel stops the ranks.

The two-process run scores the held-out text with the teacher itself (``val_teacher=None``, as for a real
vocabulary), so the teacher travels to rank 0 too; the files of the other case (kept held-out logits) and of the
cache are checked in process, without spawning (each spawn costs seconds of imports).

The data makes the ranks' shares unequal on purpose: rows lose a varying prefix of targets (as prompts would), and
41 sequences in global batches of 10 leave a last batch of one row, so rank 1 holds none. A per-rank mean loss
would then weigh tokens differently from one process; the sum / global-count loss does not.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

import engine.lm.components  # noqa: F401  (registers the token_kd loss)
import jobspec
from engine.errors import Cancelled, InvalidSpec, TrainingDiverged
from engine.lm import distributed
from engine.lm.distributed import RankFailed, fit_lm_ddp
from engine.lm.divergence import TeacherCache
from engine.lm.text_data import TokenBlocks
from engine.lm.training import LMContext, fit_lm, logits_of, shifted, teacher_val_logits
from engine.registry import losses
from engine.training.progress import ProgressTracker
from tests.engine.helpers import RecordingReporter
from tests.support import lm

pytestmark = pytest.mark.slow  # starts worker processes (torch.multiprocessing spawn, gloo)

SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = lm.tokenizer()
    ids = lm.blocks(tok, lm.documents(6), SEQ)
    ones = torch.ones_like(ids)
    target = ones.bool()
    for i in range(ids.shape[0]):
        target[i, : (i % 5) * 4] = False  # a prompt-like prefix without targets: unequal token counts per row
    data = TokenBlocks(ids[:41], ones[:41], target[:41])
    val = TokenBlocks(ids[41:57], ones[41:57], target[41:57])
    student = lm.build_model(tok, "llama", layers=2, hidden=32, intermediate=64, seed=0)
    teacher = lm.build_model(tok, "llama", layers=2, hidden=32, intermediate=64, seed=1).eval()
    step = jobspec.DistillStep(loss={"type": "token_kd", "top_k": 16, "sft_weight": 0.2}, epochs=2, batch_size=10,
                               grad_accumulation=2, optimizer={"type": "adamw", "lr": 1e-2, "weight_decay": 0.0},
                               schedule={"type": "constant"}, max_seq_len=SEQ)
    # A memory-mapped cache (memory_limit_bytes=0), as the pipeline keeps a large one: the ranks map its files.
    work = tmp_path_factory.mktemp("ddp")
    cache = TeacherCache(data.n, SEQ - 1, vocab=len(tok), top_k=16, directory=work, memory_limit_bytes=0)
    with torch.no_grad():
        ids_, att, _, _ = shifted(data, torch.arange(data.n), torch.device("cpu"))
        cache.put(torch.arange(data.n), losses.build(step.loss).targets(logits_of(teacher, ids_, att)))
    return tok, data, val, student, teacher, step, cache, teacher_val_logits(teacher, val, torch.device("cpu")), work


def _ctx(setup, reporter: RecordingReporter, name: str) -> LMContext:
    tok, data, val, student, teacher, step, cache, val_teacher, work = setup
    model = lm.build_model(tok, "llama", layers=2, hidden=32, intermediate=64, seed=0)
    model.load_state_dict(student.state_dict())
    return LMContext(student=model.train(), teacher=teacher, val=val, device=torch.device("cpu"), reporter=reporter,
                     progress=ProgressTracker(reporter, step.epochs), generator=torch.Generator().manual_seed(0),
                     work_dir=Path(work) / name, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)


def _ranks_alive() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("distillery-ddp-")]


def test_two_processes_train_as_one(setup):
    _, data, _, _, _, step, cache, _, _ = setup
    one, two = RecordingReporter(), RecordingReporter()
    ctx1, ctx2 = _ctx(setup, one, "one"), _ctx(setup, two, "two")
    info1 = fit_lm(ctx1, step, 0, data, cache=cache, val_teacher=None)
    started = time.perf_counter()
    info2 = fit_lm_ddp(ctx2, step, 0, data, cache=cache, val_teacher=None, devices=2)
    seconds = time.perf_counter() - started
    curves = {k: [(h["train_loss"], h["perplexity"]) for h in c.history] for k, c in (("1", ctx1), ("2", ctx2))}
    print(f"fit_lm_ddp 2 processes: {seconds:.1f}s; (train loss, held-out perplexity) per epoch {curves}")
    for h1, h2 in zip(ctx1.history, ctx2.history, strict=True):
        assert h2["epoch"] == h1["epoch"] and h2["kind"] == h1["kind"] == "distill"
        for key in ("train_loss", "perplexity", "nll", "kl", "agreement"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-3, abs=1e-4), key
    # The reporter saw the same metrics, in the same order, and the same progress shape, from the parent.
    assert [(m["epoch"], m["name"]) for m in two.metrics] == [(m["epoch"], m["name"]) for m in one.metrics]
    assert [m["value"] for m in two.metrics] == pytest.approx([m["value"] for m in one.metrics], rel=1e-3)
    assert [p["fraction"] for p in two.progresses] == [p["fraction"] for p in one.progresses]
    assert info2["best_epoch"] == info1["best_epoch"] and info2["epochs"] == 2 and info2["on_policy_batches"] == 0
    assert info2["train_tokens_per_second"] > 0
    # The ranks' final weights came back into ctx2.student (safetensors), close to the single process' weights.
    w1, w2 = ctx1.student.state_dict(), ctx2.student.state_dict()
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst
    assert not ctx2.student.training and not _ranks_alive()
    assert not list((Path(ctx2.work_dir)).glob("ddp-*"))  # the transfer folder is gone
    # The parent drew the same batch orders from the generator as fit_lm: both are left in the same state.
    assert torch.equal(ctx1.generator.get_state(), ctx2.generator.get_state())


def test_a_cancel_terminates_the_ranks(setup):
    _, data, _, _, _, step, cache, val_teacher, _ = setup
    reporter = RecordingReporter(stop_after=4)
    ctx = _ctx(setup, reporter, "cancel")
    before = {k: v.clone() for k, v in ctx.student.state_dict().items()}
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        fit_lm_ddp(ctx, step, 0, data, cache=cache, val_teacher=val_teacher, devices=2)
    assert time.perf_counter() - started < 15
    assert not _ranks_alive()
    assert all(torch.equal(before[k], v) for k, v in ctx.student.state_dict().items())  # untouched
    assert not list(Path(ctx.work_dir).glob("ddp-*"))


def test_what_the_ranks_read_is_what_the_parent_holds(setup, tmp_path):
    tok, data, val, _, teacher, step, cache, val_teacher, _ = setup
    ctx = _ctx(setup, RecordingReporter(), "files")
    memory = TeacherCache(data.n, SEQ - 1, vocab=len(tok), top_k=16, directory=tmp_path)  # in memory: np.save'd
    memory.put(torch.arange(data.n), cache.get(torch.arange(data.n)))
    rows = torch.tensor([3, 0, 40, 7])
    for held in (cache, memory):
        folder = tmp_path / f"disk{held.on_disk}"
        folder.mkdir()
        job = distributed._write_inputs(folder, ctx, step, data, held, val_teacher, 10, teacher=True)
        assert job["dtype"] == job["teacher_dtype"] == "float32" and (job["cache"]["logprobs"] == str(
            held.logprobs.filename) if held.on_disk else str(folder) in job["cache"]["logprobs"])
        got, want = distributed._MappedTargets(job["cache"]).get(rows, "cpu"), held.get(rows)
        assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.indices, want.indices)
    for prefix, blocks in (("train", data), ("val", val)):
        back = distributed._blocks(folder, prefix)
        assert all(torch.equal(getattr(back, k), getattr(blocks, k)) for k in ("input_ids", "attention_mask",
                                                                              "target_mask"))
    assert all(torch.equal(a, b) for a, b in zip(distributed._val_teacher(folder), val_teacher, strict=True))
    student = distributed._model(folder / "student", "float32", torch.device("cpu"))
    assert all(torch.equal(v, ctx.student.state_dict()[k]) for k, v in student.state_dict().items())
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))  # safetensors and .npy only


def test_rank_failures_become_precise_errors(monkeypatch):
    """The parent's reading of a rank's message or exit status (no processes needed)."""
    diverged = distributed._error({"type": "error", "rank": 1, "code": "training_diverged", "traceback": "",
                                   "message": "step 0, epoch 2: the loss became nan"})
    assert isinstance(diverged, TrainingDiverged) and diverged.message.startswith("data-parallel rank 1: step 0")
    assert isinstance(distributed._error({"rank": 0, "code": "invalid_spec", "message": "x", "traceback": ""}),
                      InvalidSpec)
    crash = distributed._error({"rank": 0, "code": "internal_error", "message": "RuntimeError: boom", "traceback": "tb"})
    assert isinstance(crash, RankFailed) and "rank 0: RuntimeError: boom" in str(crash)
    assert isinstance(distributed._error({"rank": 1, "code": "memory", "message": "MemoryError: ", "traceback": ""}),
                      MemoryError)
    monkeypatch.setattr(distributed, "DRAIN_SECONDS", 0.05)
    empty = multiprocessing.get_context("spawn").Queue()
    killed = distributed._death(empty, [0, -9])
    assert isinstance(killed, RankFailed) and "rank 1 was killed by SIGKILL" in str(killed)
    assert "status 3" in str(distributed._death(empty, [None, 3]))
