"""Checkpoint / resume: a job killed mid-way and run again with the same checkpoint_dir resumes
and ends with exactly the weights of an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine import Cancelled
from engine import run
from engine import has_checkpoint
from engine.training.checkpoint import CHECKPOINT_FILE

from .helpers import RecordingReporter, make_spec

torch.set_num_threads(1)

DISTILL = {"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9}, "epochs": 5, "batch_size": 128,
           "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.01, "momentum": 0.9}}


class StopAfterEpoch(RecordingReporter):
    """Asks to stop at the first poll after epoch ``epoch`` of step ``step`` finished (a worker dying then)."""

    def __init__(self, step: int, epoch: int):
        super().__init__()
        self.at = (step, epoch)
        self.stop = False

    def progress(self, progress: dict) -> None:
        super().progress(progress)
        if (progress["step_index"], progress["epoch"]) == self.at:
            self.stop = True

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop


def _spec(steps: list[dict], **kw) -> dict:
    spec = make_spec(exports=["safetensors"], steps=steps, **kw)
    spec["student"]["dropout"] = 0.1  # dropout draws from torch's global RNG: resume must restore it
    return spec


def _job(spec, teacher, data, out, reporter, ckpt_dir, every=0.0):
    return run(spec, teacher, data, out, reporter, device="cpu", threads=1, checkpoint_dir=ckpt_dir,
               checkpoint_every_seconds=every)


def _weights(result, step: int | None = None) -> dict[str, torch.Tensor]:
    files = [a for a in result.artifacts if a.kind == "student" and a.format == "safetensors"]
    last = max(a.step_index for a in files) if step is None else step
    (f,) = [a for a in files if a.step_index == last]
    return load_file(str(f.path))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _interrupted_then_resumed(spec, teacher, data, tmp_path, step: int, epoch: int, every=0.0):
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        _job(spec, teacher, data, tmp_path / "attempt1", StopAfterEpoch(step, epoch), ckpt_dir, every)
    reporter = RecordingReporter()
    result = _job(spec, teacher, data, tmp_path / "attempt2", reporter, ckpt_dir, every)
    assert not [e for e in reporter.events if e[0] == "checkpoint"], "the checkpoint should resume cleanly"
    return result, reporter, ckpt_dir


def _meta(ckpt_dir) -> dict:
    raw = torch.load(ckpt_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return json.loads(raw["meta"])


def test_resume_mid_distill_gives_the_uninterrupted_weights(teacher_ts, digits_npz, tmp_path):
    spec = _spec([DISTILL])
    reference = _job(spec, teacher_ts, digits_npz, tmp_path / "ref", RecordingReporter(), None)
    result, reporter, ckpt_dir = _interrupted_then_resumed(spec, teacher_ts, digits_npz, tmp_path, 0, 2)

    _assert_same(_weights(result), _weights(reference))
    resumed = [e for e in reporter.events if e[0] == "resumed"]
    assert len(resumed) == 1 and resumed[0][1].startswith("resuming from step 0, epoch 2 (checkpoint of ")
    assert resumed[0][3]["step"] == 0 and resumed[0][3]["epoch"] == 2
    # only the remaining epochs trained; history and progress continue from the checkpoint
    assert sorted({m["epoch"] for m in reporter.metrics if m["name"] == "train_loss"}) == [3, 4, 5]
    assert reporter.progresses[-1]["fraction"] == 1.0
    for key in ("accuracy", "agreement", "f1_macro"):
        assert result.report["steps"][0][key] == reference.report["steps"][0][key]
    assert has_checkpoint(ckpt_dir)
    meta = _meta(ckpt_dir)  # the all-steps-done checkpoint: the whole metric history, no student needed
    assert meta["step"] == 1 and [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4, 5]


def test_resume_skips_finished_steps_and_restores_early_stopping(teacher_ts, digits_npz, tmp_path):
    second = {**DISTILL, "epochs": 6, "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
              "schedule": {"type": "one_cycle"},
              # best epoch 1, then no gain of 0.2: stops after epoch 4 and restores epoch 1's weights
              "early_stopping": {"patience": 3, "metric": "accuracy", "min_delta": 0.2},
              "augment": {"noise": 0.05},
              "hints": [{"teacher": "penultimate", "student": "penultimate", "weight": 0.5, "distance": "mse"}]}
    spec = _spec([DISTILL, second])
    reference = _job(spec, teacher_ts, digits_npz, tmp_path / "ref", RecordingReporter(), None)
    result, reporter, _ = _interrupted_then_resumed(spec, teacher_ts, digits_npz, tmp_path, 1, 2)

    _assert_same(_weights(result), _weights(reference))
    _assert_same(_weights(result, 0), _weights(reference, 0))  # step 0's export restored from the checkpoint
    assert [e[3]["index"] for e in reporter.events if e[0] == "step_started"] == [1]
    assert not any(m["step"] == 0 for m in reporter.metrics)
    assert sorted(a.path.name for a in result.artifacts if a.step_index == 0) == \
        sorted(a.path.name for a in reference.artifacts if a.step_index == 0)
    assert all(a.path.is_file() and a.path.parent == tmp_path / "attempt2" for a in result.artifacts)
    ref_rows, rows = reference.report["steps"], result.report["steps"]
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in ref_rows]
    assert rows[1]["early_stopping"] == ref_rows[1]["early_stopping"]
    assert (rows[1]["early_stopping"]["best_epoch"], rows[1]["early_stopping"]["epochs_run"]) == (1, 4)


def test_step_boundary_checkpoint_with_a_long_interval(teacher_ts, digits_npz, tmp_path):
    """With a long interval only step boundaries are checkpointed: the interrupted step restarts."""
    spec = _spec([DISTILL, {**DISTILL, "epochs": 3}])
    reference = _job(spec, teacher_ts, digits_npz, tmp_path / "ref", RecordingReporter(), None)
    result, reporter, _ = _interrupted_then_resumed(spec, teacher_ts, digits_npz, tmp_path, 1, 2, every=3600)
    _assert_same(_weights(result), _weights(reference))
    (resumed,) = [e for e in reporter.events if e[0] == "resumed"]
    assert resumed[3]["step"] == 1 and resumed[3]["epoch"] == 0
    assert sorted({m["epoch"] for m in reporter.metrics if m["name"] == "train_loss"}) == [1, 2, 3]


def test_resume_after_channel_pruning_rebuilds_the_chain(teacher_ts, digits_npz, tmp_path):
    """A channel-pruned student is rebuilt from its ``sequential`` architecture; a quantized one is not,
    but once every step is done the checkpoint needs no student."""
    spec = _spec([DISTILL, {"kind": "prune", "method": "channel", "amount": 0.5},
                  {**DISTILL, "epochs": 3}, {"kind": "quantize", "method": "dynamic_int8"}])
    spec["exports"] = ["safetensors", "torchscript"]
    reference = _job(spec, teacher_ts, digits_npz, tmp_path / "ref", RecordingReporter(), None)
    result, reporter, ckpt_dir = _interrupted_then_resumed(spec, teacher_ts, digits_npz, tmp_path, 2, 1)
    (resumed,) = [e for e in reporter.events if e[0] == "resumed"]
    assert (resumed[3]["step"], resumed[3]["epoch"]) == (2, 1)
    _assert_same(_weights(result, 2), _weights(reference, 2))
    assert [r["accuracy"] for r in result.report["steps"]] == [r["accuracy"] for r in reference.report["steps"]]
    assert result.report["architecture"] == reference.report["architecture"]
    assert _meta(ckpt_dir)["step"] == 4


def test_other_jobs_and_broken_files_are_ignored_with_a_warning(teacher_ts, digits_npz, tmp_path):
    spec = _spec([{**DISTILL, "epochs": 3}])
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        _job(spec, teacher_ts, digits_npz, tmp_path / "a", StopAfterEpoch(0, 1), ckpt_dir)
    assert has_checkpoint(ckpt_dir)

    other = _spec([{**DISTILL, "epochs": 3}], seed=1)
    reporter = RecordingReporter()
    _job(other, teacher_ts, digits_npz, tmp_path / "b", reporter, ckpt_dir)
    warnings = [e for e in reporter.events if e[0] == "checkpoint" and e[2] == "warning"]
    assert warnings and "spec_sha256" in warnings[0][1]
    assert "resumed" not in reporter.event_types()
    assert sorted({m["epoch"] for m in reporter.metrics if m["name"] == "train_loss"}) == [1, 2, 3]

    (ckpt_dir / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    reporter = RecordingReporter()
    _job(spec, teacher_ts, digits_npz, tmp_path / "c", reporter, ckpt_dir)
    assert any(e[0] == "checkpoint" and e[2] == "warning" and "unreadable" in e[1] for e in reporter.events)
    assert "resumed" not in reporter.event_types()


def test_no_checkpoint_dir_writes_nothing(teacher_ts, digits_npz, tmp_path):
    assert not has_checkpoint(None) and not has_checkpoint(tmp_path)
    _job(_spec([{**DISTILL, "epochs": 1}]), teacher_ts, digits_npz, tmp_path / "out", RecordingReporter(), None)
    assert not any(p.name == CHECKPOINT_FILE for p in tmp_path.rglob("*"))


def test_a_release_checkpoints_at_the_next_epoch_end_and_resumes_there(teacher_ts, digits_npz, tmp_path,
                                                                       monkeypatch):
    """The worker shutting down writes ``release-requested``: the executor's reporter asks for a checkpoint at
    the next epoch end (whatever the interval) and stops right after it; the next attempt resumes there."""
    import io

    from engine.training import checkpoint
    from worker.executor import PipeReporter

    monkeypatch.setattr(checkpoint, "URGENT", checkpoint._Urgent())
    release = tmp_path / "release-requested"

    class Releasing(PipeReporter):
        def progress(self, progress: dict) -> None:
            super().progress(progress)
            if progress.get("epoch") == 2 and not release.exists():
                release.touch()
                self._next_look = 0.0  # look at once (the reporter otherwise stats at most every 0.2 s)

    spec = _spec([{**DISTILL, "epochs": 6}])
    reference = _job(spec, teacher_ts, digits_npz, tmp_path / "ref", RecordingReporter(), None)
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        _job(spec, teacher_ts, digits_npz, tmp_path / "a1", Releasing(io.StringIO(), release), ckpt_dir, every=3600)
    assert _meta(ckpt_dir)["epoch"] >= 2  # not the step boundary: the release wrote its own checkpoint
    monkeypatch.setattr(checkpoint, "URGENT", checkpoint._Urgent())
    reporter = RecordingReporter()
    result = _job(spec, teacher_ts, digits_npz, tmp_path / "a2", reporter, ckpt_dir, every=3600)
    _assert_same(_weights(result), _weights(reference))
    (resumed,) = [e for e in reporter.events if e[0] == "resumed"]
    assert resumed[3]["epoch"] >= 2
