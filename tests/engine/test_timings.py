"""A job's phase timings (the ``timings`` event = report.json's ``timings``) and the fixed cost they show:
the student scripted once, the report's side work in the background, latency runs that stop when steady."""

from __future__ import annotations

import time

import pytest

from engine import EngineError, run
from engine.export import formats as export_mod
from engine.report.background import SideWork, teacher_gzip_size
from engine.report.latency import median_latency_ms
from engine.report.timings import JobTimings, activate, phase

from .helpers import RecordingReporter, make_spec

#: Phases on the main thread: they add up to the job's wall time (less the glue between them).
CRITICAL = {"validate", "load", "teacher_scoring", "student", "cache", "train", "evaluate", "measure", "latency",
            "export", "verify", "baseline", "report", "card", "background_wait"}


def test_phases_nest_exclusively_and_finish_fixes_the_numbers():
    timings = JobTimings()
    with activate(timings):
        with phase("export"):
            time.sleep(0.02)
            with phase("verify"):
                time.sleep(0.03)
            with phase("report"):  # still open when the numbers are fixed: counted up to then
                time.sleep(0.01)
                final = timings.finish()
    assert final["verify"] >= 0.03 and 0.02 <= final["export"] < 0.03 + 0.02
    assert final["report"] >= 0.01
    assert final["total"] >= final["export"] + final["verify"] + final["report"]
    assert timings.finish() == final  # later calls repeat the report's numbers
    with phase("train"):  # outside a job: nothing is recorded, nothing fails
        pass
    assert "train" not in timings.seconds


def test_a_steady_latency_is_timed_fewer_times():
    calls: list[int] = []
    median_latency_ms(lambda: calls.append(1), warmup=3, runs=25, stable_within=0.5)
    assert 3 + 7 <= len(calls) < 3 + 25
    calls.clear()
    median_latency_ms(lambda: calls.append(1), warmup=3, runs=25)  # without the option: every run
    assert len(calls) == 28


def test_side_work_runs_in_the_background_and_reports_errors(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4096)
    timings = JobTimings()
    side = SideWork(timings)
    try:
        side.start_files(path, {"data": path})
        side.start_files(path, {"data": path})  # started once
        side.submit("broken", "plots", lambda: 1 / 0)
        assert side.result("teacher_gzip") == teacher_gzip_size(path) < path.stat().st_size
        assert side.sha256(path) == side.sha256(path, "") and side.sha256(path, "known") == "known"
        with pytest.raises(ZeroDivisionError):
            side.result("broken")
        assert side.result("never", lambda: "here") == "here"
    finally:
        side.close()
    assert timings.finish()["hashes"] > 0
    assert teacher_gzip_size(tmp_path) is None  # a directory has no gzip size


@pytest.mark.plots
def test_every_job_ends_with_its_timings(ts_run):
    result, reporter, _ = ts_run
    types = reporter.event_types()
    assert types[-1] == "timings" and types.count("timings") == 1
    data = reporter.events[-1][3]
    assert data == result.report["timings"]
    assert {"validate", "teacher_scoring", "cache", "train", "measure", "latency", "export", "verify", "plots",
            "card", "report", "total"} <= set(data)
    assert all(v >= 0 for v in data.values())
    on_path = sum(v for k, v in data.items() if k in CRITICAL)
    assert 0.5 * data["total"] <= on_path <= data["total"] + 0.01
    # the plots were drawn in the background, and are there
    assert sorted(a.path.name for a in result.artifacts if a.kind == "plot") == ["compression.png",
                                                                                 "training_curves.png"]
    assert all(a.path.stat().st_size > 0 for a in result.artifacts if a.kind in ("plot", "model_card"))


def test_the_student_is_scripted_once_and_sized_as_shipped(teacher_ts, digits_npz, tmp_path, monkeypatch):
    scripted: list[int] = []
    real = export_mod.script_student
    monkeypatch.setattr(export_mod, "script_student", lambda *a, **k: scripted.append(1) or real(*a, **k))
    reporter = RecordingReporter()
    result = run(make_spec(step__epochs=2, exports=["torchscript"]), teacher_ts, digits_npz, tmp_path, reporter,
                 device="cpu", threads=1)
    assert len(scripted) == 1  # measured and exported from the same bytes
    student = next(a for a in result.artifacts if a.kind == "student")
    assert result.report["student"]["size_bytes"] == student.path.stat().st_size
    assert result.report["teacher"]["size_gzip_bytes"] == teacher_gzip_size(teacher_ts.path)
    assert reporter.event_types()[-1] == "timings" and reporter.events[-1][3] == result.report["timings"]


def test_a_failed_job_still_reports_its_timings(teacher_ts, digits_npz, tmp_path):
    reporter = RecordingReporter()
    with pytest.raises(EngineError):
        run(make_spec(dataset_id="missing"), teacher_ts, {"other": digits_npz}, tmp_path, reporter, device="cpu",
            threads=1)
    assert reporter.event_types()[-1] == "timings" and reporter.events[-1][3]["total"] > 0
