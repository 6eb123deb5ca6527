"""Test helpers for the engine suite (recording reporter, spec builder)."""

from __future__ import annotations

import copy
from typing import Any


class RecordingReporter:
    """Reporter that records everything; optionally asks to stop after N polls."""

    def __init__(self, stop_after: int | None = None):
        self.events: list[tuple[str, str, str, dict | None]] = []
        self.progresses: list[dict] = []
        self.metrics: list[dict] = []
        self.stop_after = stop_after
        self.polls = 0

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((type, message, level, data))

    def progress(self, progress: dict) -> None:
        self.progresses.append(dict(progress))

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        self.metrics.append({"step": step, "epoch": epoch, "name": name, "value": value})

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after

    def event_types(self) -> list[str]:
        return [e[0] for e in self.events]


BASE_SPEC: dict[str, Any] = {
    "teacher_model_id": "mdl_test",
    "dataset_id": "ds_test",
    "student": {"family": "mlp", "hidden": [32], "activation": "relu", "dropout": 0.0},
    "steps": [
        {
            "kind": "distill",
            "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9},
            "epochs": 25,
            "batch_size": 128,
            "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9},
        }
    ],
    "val_fraction": 0.1,
    "exports": [],  # a test about exports asks for them (see ALL_EXPORTS)
    "seed": 0,
    "metadata": {},
}


#: Every export format: for the tests about exports (the shared ``ts_run`` job).
ALL_EXPORTS = ["torchscript", "onnx", "safetensors"]


def make_spec(**overrides: Any) -> dict[str, Any]:
    """A copy of BASE_SPEC; ``step__key=value`` overrides keys of steps[0]."""
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        if key.startswith("step__"):
            spec["steps"][0][key[len("step__"):]] = value
        else:
            spec[key] = value
    return spec
