"""``GET /v1/capabilities``: every component the spec offers, with the JSON schema of its config."""

from __future__ import annotations

from typing import Any

from jobspec.base import ALL_EXPORT_FORMATS, DATASET_FORMATS, EXPORT_FORMATS, LM_EXPORT_FORMATS, MODEL_FORMATS, TASKS, Config
from jobspec.losses import HINT_DISTANCES, LOSSES
from jobspec.steps import GATE_METRICS, PRUNE_METHODS, QUANTIZE_METHODS, STEP_KINDS
from jobspec.search import OBJECTIVES, SEARCH_METRICS, SPACE_FAMILIES
from jobspec.students import STUDENT_FAMILIES, STUDENT_SOURCES
from jobspec.training import OPTIMIZERS, SCHEDULES


def _table(components: dict[str, type[Config]], key: str) -> list[dict[str, Any]]:
    out = []
    for name, cls in components.items():
        schema = cls.model_json_schema()
        schema.get("properties", {}).pop(key, None)
        out.append({"name": name, "description": (cls.__doc__ or "").strip().split("\n")[0],
                    "config_schema": schema})
    return out


def capabilities() -> dict[str, Any]:
    return {
        "step_kinds": _table(STEP_KINDS, "kind"),
        "losses": _table(LOSSES, "type"),
        "student_families": _table(STUDENT_FAMILIES, "family"),
        "student_sources": list(STUDENT_SOURCES),
        "optimizers": list(OPTIMIZERS),
        "schedules": list(SCHEDULES),
        "hint_distances": list(HINT_DISTANCES),
        "synthesizers": ["generator"],
        "coreset_methods": ["kmeans", "random"],
        "input_reductions": ["pca", "select_k_best"],
        "prune_methods": list(PRUNE_METHODS),
        "quantize_methods": list(QUANTIZE_METHODS),
        "gate_metrics": list(GATE_METRICS),
        "model_formats": list(MODEL_FORMATS),
        "tasks": list(TASKS),
        "dataset_formats": list(DATASET_FORMATS),
        "export_formats": list(ALL_EXPORT_FORMATS),
        "export_formats_by_task": {task: list(LM_EXPORT_FORMATS if task == "causal_lm" else EXPORT_FORMATS)
                                   for task in TASKS},
        # The job field "search" (jobspec/search.py): objectives, metrics, and each family's ranges.
        "search": {"objectives": list(OBJECTIVES), "metrics": list(SEARCH_METRICS),
                   "space_families": _table(SPACE_FAMILIES, "family")},
    }
