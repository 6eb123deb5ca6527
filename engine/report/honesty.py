"""Warnings about what a report's comparisons can and cannot say (``report["warnings"]``).

A student's drop is measured against the teacher's score on the job's held-out split. Teachers are often scored
on rows they were trained on: a teacher at ≥ :data:`NEAR_PERFECT` there has probably seen the split, and a drop
against it overstates what the student lost on new data (it is compared with a memorised answer key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: A teacher at or above this held-out accuracy / R² is flagged.
NEAR_PERFECT = 0.99
_METRICS = ("accuracy", "r2")


def report_warnings(teacher_row: Mapping[str, Any], labelled: bool) -> list[dict[str, Any]]:
    """``[{"code", "message", "metric", "value"}]``: today ``teacher_near_perfect`` when the teacher's held-out
    accuracy (classification) or R² (regression) against the labels is ≥ :data:`NEAR_PERFECT`."""
    if not labelled:
        return []
    out = []
    for metric in _METRICS:
        value = teacher_row.get(metric)
        if isinstance(value, int | float) and value >= NEAR_PERFECT:
            out.append({
                "code": "teacher_near_perfect", "metric": metric, "value": float(value),
                "message": (f"the teacher scores {value:.4f} {metric} on the held-out split: it may have seen this "
                            "data. Drops against the teacher then overstate what the student lost on new data; gate "
                            "against the labels (gate: {\"against\": \"labels\", \"min\": …}) or score on rows the "
                            "teacher never saw (eval_dataset_id)."),
            })
    return out
