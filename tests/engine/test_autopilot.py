"""Defaults that converge (the ``plateau`` schedule), ``"auto"`` values and honest comparisons.

Unit tests of the scheduler and the stopping rule, then short digits jobs through ``engine.run``.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import jobspec
from engine import EngineError, run
from engine.training.early_stopping import EarlyStopping
from engine.training.optim import Scheduler, lr_factor

from .helpers import RecordingReporter, make_spec


def _run(spec, teacher, data, tmp_path, reporter=None):
    return run(spec, teacher, data, tmp_path / "out", reporter or RecordingReporter(), device="cpu", threads=1)


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


# ---- the plateau schedule ---------------------------------------------------------------------------


def test_a_step_that_names_no_schedule_gets_plateau():
    step = jobspec.DistillStep()
    assert step.schedule.type == "plateau"
    assert step.schedule.plateau_patience(40) == 4 and step.schedule.plateau_patience(5) == 2
    assert step.schedule.plateau_patience(1000) == 10
    # a fine-tune is a short fixed run: it keeps its clock
    assert jobspec.Finetune().schedule.type == "cosine"


def test_plateau_keeps_the_lr_until_patience_runs_out_then_cuts_it():
    opt = _optimizer(0.1)
    sched = Scheduler(opt, jobspec.ScheduleConfig(type="plateau", patience=2, factor=0.5), total_steps=100, epochs=10)
    for _ in range(30):
        sched.step()
    assert sched.lr == pytest.approx(0.1)  # no clock: 30 batches change nothing
    assert sched.epoch_end(improved=True) is False
    assert sched.epoch_end(improved=False) is False
    assert sched.epoch_end(improved=True) is False  # an improvement resets the count
    assert sched.epoch_end(improved=False) is False
    assert sched.epoch_end(improved=False) is True
    assert sched.lr == pytest.approx(0.05)
    sched.step()
    assert sched.lr == pytest.approx(0.05)  # the cut survives batch steps
    state = sched.state_dict()
    again = Scheduler(_optimizer(0.1), jobspec.ScheduleConfig(type="plateau", patience=2), total_steps=100, epochs=10)
    again.load_state_dict(state)
    assert again.lr == pytest.approx(0.05)
    # checkpoints written before plateau existed hold only the clock
    old = Scheduler(_optimizer(0.1), jobspec.ScheduleConfig(type="plateau"), total_steps=100, epochs=10)
    old.load_state_dict({"count": 5, "total": 100})
    assert old.lr == pytest.approx(0.1)


def test_clock_schedules_ignore_plateaus():
    sched = Scheduler(_optimizer(0.1), jobspec.ScheduleConfig(type="cosine"), total_steps=10, epochs=10)
    for _ in range(5):
        assert sched.epoch_end(improved=False) is False
    assert sched.lr == pytest.approx(0.1)
    assert lr_factor(jobspec.ScheduleConfig(type="plateau", warmup_fraction=0.5), 0, 10) == pytest.approx(1 / 6)
    assert lr_factor(jobspec.ScheduleConfig(type="plateau"), 9, 10) == 1.0


def test_plateau_stops_after_two_fruitless_cuts_on_the_held_out_loss():
    model = torch.nn.Linear(1, 1)
    stopper = EarlyStopping(None, "classification", True, schedule=jobspec.ScheduleConfig(patience=2), epochs=40)
    assert stopper.implicit and stopper.metric == "loss" and stopper.config.patience == 5
    assert not stopper.update(1.0, 1, model, 1.0)
    assert stopper.improved
    stops = [stopper.update(1.5, e, model, 1.5) for e in range(2, 7)]
    assert stops == [False, False, False, False, True]
    assert stopper.best[1] == 1
    # without a plateau schedule and without early_stopping nothing stops
    assert not EarlyStopping(None, "classification", True, schedule=jobspec.ScheduleConfig(type="cosine")).active


def test_an_unchanged_metric_with_a_lower_held_out_loss_is_progress():
    model = torch.nn.Linear(1, 1)
    stopper = EarlyStopping(jobspec.EarlyStopping(patience=2), "classification", True)
    stopper.update(0.9, 1, model, 0.50)
    stopper.update(0.9, 2, model, 0.40)
    assert stopper.improved and stopper.best[1] == 2
    stopper.update(0.9, 3, model, 0.45)
    assert not stopper.improved and stopper.bad_epochs == 1
    stopper.update(0.9, 4, model, math.nan)
    assert stopper.bad_epochs == 2


def test_an_over_fitting_default_job_stops_and_restores_its_best_epoch(teacher_ts, write_npz, digits, tmp_path):
    """100 labelled rows, labels only (α 0), a wide student and 60 epochs: the held-out loss turns up; the default
    schedule cuts the lr, stops before 60 and ships the best epoch (its held-out accuracy is the report's)."""
    x, y = digits
    data = write_npz("digits100", x=x[:100], y=y[:100], x_val=x[1000:1400], y_val=y[1000:1400])
    spec = make_spec(student={"family": "mlp", "hidden": [256]}, step__epochs=60, step__batch_size=16,
                     step__optimizer={"type": "adam", "lr": 0.01}, step__loss={"type": "kd", "alpha": 0.0})
    assert "schedule" not in spec["steps"][0]
    rep = RecordingReporter()
    result = _run(spec, teacher_ts, data, tmp_path, rep)
    row = result.report["steps"][0]
    assert row["schedule"]["type"] == "plateau" and row["schedule"]["lr_cut_after_epochs"]
    stop = row["early_stopping"]
    assert stop["metric"] == "loss" and stop["epochs_run"] < 60 and stop["best_epoch"] < stop["epochs_run"]
    assert "lr_reduced" in rep.event_types() and "early_stopping" in rep.event_types()
    # the shipped student is the best epoch's: its held-out loss is the lowest of the history
    accuracy = [m["value"] for m in rep.metrics if m["name"] == "val_accuracy"]
    assert len(accuracy) == stop["epochs_run"]
    assert result.metrics["student"]["accuracy"] == pytest.approx(accuracy[stop["best_epoch"] - 1])


def test_an_explicit_schedule_is_honoured_exactly(teacher_ts, digits_npz, tmp_path):
    spec = make_spec(step__epochs=3, step__schedule={"type": "cosine", "warmup_fraction": 0.0})
    result = _run(spec, teacher_ts, digits_npz, tmp_path)
    row = result.report["steps"][0]
    assert "schedule" not in row and "early_stopping" not in row


# ---- "auto" ------------------------------------------------------------------------------------------


def test_auto_values_validate_and_others_are_refused():
    step = jobspec.DistillStep(epochs="auto", optimizer={"lr": "auto"}, loss={"type": "kd", "temperature": "auto"})
    assert step.max_epochs == jobspec.training.AUTO_EPOCHS
    bad = [{"epochs": 0}, {"epochs": "many"}, {"optimizer": {"lr": 0}}, {"optimizer": {"lr": "best"}},
           {"loss": {"type": "kd", "temperature": 0}}, {"epochs": "auto", "schedule": {"type": "cosine"}},
           {"loss": {"type": "soft_ce", "temperature": "auto"}}]
    for fields in bad:
        with pytest.raises(ValidationError):
            jobspec.DistillStep(**fields)
    with pytest.raises(ValidationError, match="fine-tune needs numbers"):
        jobspec.Finetune(optimizer={"lr": "auto"})
    # auto epochs with an explicit clock schedule is fine once early stopping says when to stop
    jobspec.DistillStep(epochs="auto", schedule={"type": "cosine"}, early_stopping={"patience": 3})


def test_auto_lr_temperature_and_epochs_are_chosen_and_shown(teacher_ts, digits_npz, tmp_path):
    spec = make_spec(step__epochs="auto", step__optimizer={"type": "adam", "lr": "auto"},
                     step__loss={"type": "kd", "temperature": "auto", "alpha": 0.9})
    rep = RecordingReporter()
    result = _run(spec, teacher_ts, digits_npz, tmp_path, rep)
    auto = result.report["steps"][0]["auto"]
    lr = auto["lr"]
    assert 1e-5 <= lr["chosen"] <= 1.0 and lr["chosen"] == pytest.approx(lr["lr_at_min_loss"] / 10)
    losses = [p["loss"] for p in lr["curve"]]
    assert min(losses) < losses[0]  # the curve went down before it blew up
    t = auto["temperature"]
    assert [c["temperature"] for c in t["candidates"]] == [4.0, 2.0, 8.0, 1.0]
    assert t["chosen"] in (4.0, 2.0, 8.0, 1.0)
    assert max(c["accuracy"] for c in t["candidates"]) == next(c["accuracy"] for c in t["candidates"]
                                                               if c["temperature"] == t["chosen"])
    ep = auto["epochs"]
    stop = result.report["steps"][0]["early_stopping"]
    assert ep["max"] == 100 and ep["ran"] == stop["epochs_run"] <= 100 and ep["best_epoch"] == stop["best_epoch"]
    assert [e for e in rep.events if e[0] == "auto"]
    assert result.metrics["student"]["accuracy"] >= 0.9


def test_auto_choices_are_deterministic(teacher_ts, digits_npz, tmp_path):
    from engine.training import autotune

    spec = make_spec(step__epochs=1, step__optimizer={"type": "adam", "lr": "auto"})
    a = _run(spec, teacher_ts, digits_npz, tmp_path / "a").report["steps"][0]["auto"]["lr"]
    b = _run(spec, teacher_ts, digits_npz, tmp_path / "b").report["steps"][0]["auto"]["lr"]
    assert a == b
    assert autotune.RANGE_TEST_STEPS == jobspec.training.AUTO_LR_BATCHES


# ---- honest comparisons --------------------------------------------------------------------------------


def test_a_teacher_that_saw_the_held_out_rows_is_flagged(teacher_ts, digits_npz, tmp_path):
    """The digits fixture teacher was trained on every row, so it is near perfect on the job's split."""
    rep = RecordingReporter()
    result = _run(make_spec(step__epochs=1), teacher_ts, digits_npz, tmp_path, rep)
    assert result.report["teacher"]["accuracy"] >= 0.99
    (w,) = result.report["warnings"]
    assert w["code"] == "teacher_near_perfect" and "may have seen this data" in w["message"]
    assert any(e[0] == "report" and e[2] == "warning" and "may have seen" in e[1] for e in rep.events)


def test_a_teacher_scored_on_new_rows_is_not_flagged(write_npz, digits, tmp_path):
    from engine.report.honesty import report_warnings

    assert report_warnings({"accuracy": 0.97}, labelled=True) == []
    assert report_warnings({"accuracy": 1.0}, labelled=False) == []
    assert report_warnings({"r2": 0.995}, labelled=True)[0]["metric"] == "r2"


def test_a_gate_against_the_labels_is_a_floor_whatever_the_teacher_scores(teacher_ts, digits_npz, tmp_path):
    passing = make_spec(step__epochs=2, step__gate={"metric": "accuracy", "against": "labels", "min": 0.5})
    row = _run(passing, teacher_ts, digits_npz, tmp_path / "a").report["steps"][0]
    assert row["gate"]["against"] == "labels" and row["gate"]["passed"] and "drop" not in row["gate"]
    failing = make_spec(step__epochs=1, step__gate={"metric": "accuracy", "against": "labels", "min": 0.999})
    with pytest.raises(EngineError, match="against the labels is below the gate's floor 0.999") as info:
        _run(failing, teacher_ts, digits_npz, tmp_path / "b")
    assert info.value.code == "quality_gate"
    with pytest.raises(ValidationError, match="needs 'min'"):
        jobspec.Gate(against="labels")
    with pytest.raises(ValidationError, match="measured against the teacher"):
        jobspec.Gate(metric="agreement", against="labels", min=0.9)


def test_causal_lm_jobs_refuse_auto_and_plateau():
    from jobspec.rules import Facts, conflicts

    spec = jobspec.JobSpec.model_validate({
        "teacher_model_id": "m", "dataset_id": "d", "student": {"derive": {"depth": 0.5}}, "exports": ["hf"],
        "steps": [{"kind": "distill", "loss": {"type": "token_kd"}, "epochs": "auto",
                   "optimizer": {"lr": "auto"}}]})
    found = {c.path for c in conflicts(spec, Facts(task="causal_lm", teacher_format="hf_transformers",
                                                   formats={"d": "jsonl"}))}
    assert {"steps[0].epochs", "steps[0].optimizer.lr", "steps[0].schedule.type"} <= found



def test_a_causal_lm_schedule_naming_only_its_warm_up_keeps_the_lm_clock():
    from jobspec.rules import with_task_defaults

    spec = jobspec.JobSpec.model_validate({
        "teacher_model_id": "m", "dataset_id": "d", "student": {"derive": {"depth": 0.5}},
        "steps": [{"kind": "distill", "schedule": {"warmup_fraction": 0.1}}]})
    schedule = with_task_defaults(spec, "causal_lm").steps[0].schedule
    assert (schedule.type, schedule.warmup_fraction) == ("cosine", 0.1)
    # a classic job keeps the plateau default
    assert with_task_defaults(spec, "classification").steps[0].schedule.type == "plateau"
