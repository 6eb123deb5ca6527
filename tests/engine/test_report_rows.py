"""Report rows: the typed row declares every task metric; a row keeps only the task's metrics."""

from __future__ import annotations

from engine.metrics import METRIC_KEYS
from engine.report.rows import ModelRow, build_report, model_row


def test_the_row_type_declares_every_metric_the_engine_measures():
    assert set(METRIC_KEYS) <= set(ModelRow.__annotations__)


def test_model_row_keeps_task_metrics_and_build_report_computes_ratios():
    teacher = model_row(1000, 4000, {"batch_1": 2.0, "batch_32": 8.0}, {"accuracy": 0.9, "train_loss": 0.1})
    student = model_row(100, 400, {"batch_1": 1.0, "batch_32": 2.0}, {"accuracy": 0.85})
    assert teacher == {"num_parameters": 1000, "size_bytes": 4000, "latency_ms": {"batch_1": 2.0, "batch_32": 8.0},
                       "accuracy": 0.9}
    report = build_report(teacher=teacher, steps=[student], student=student, reproducibility={}, data={})
    assert (report["compression_ratio"], report["parameter_ratio"], report["speedup"]) == (10.0, 10.0, 4.0)
