"""engine.devices: the CPU-thread choice for jobs whose deployment names none."""

from __future__ import annotations

import torch

from engine.devices import SMALL_BATCH_WORK, cpu_threads


def test_small_work_per_batch_uses_one_thread_and_large_work_every_core():
    assert cpu_threads(10_000, 128, available=8) == 1
    assert cpu_threads(SMALL_BATCH_WORK // 128, 128, available=8) == 8  # at the bound: all cores
    assert cpu_threads(5_000_000, 256, available=8) == 8
    assert cpu_threads(5_000_000, 256, available=0) == 1


def test_a_small_cpu_job_runs_on_one_thread_and_an_explicit_setting_wins(teacher_ts, digits_npz, tmp_path):
    from engine import run
    from tests.engine.helpers import RecordingReporter, make_spec

    spec = make_spec(exports=[], step__epochs=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(spec, teacher_ts, digits_npz, tmp_path / "auto", RecordingReporter(), device="cpu")
        assert torch.get_num_threads() == 1  # the digits teacher is ~10k weights
        run(spec, teacher_ts, digits_npz, tmp_path / "set", RecordingReporter(), device="cpu", threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
