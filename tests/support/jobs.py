"""Job request bodies used across suites."""


def job_body(model_id: str, dataset_id: str, **overrides) -> dict:
    """A small, valid KD job (2 epochs into an mlp[32]); keyword overrides replace top-level fields."""
    return {"teacher_model_id": model_id, "dataset_id": dataset_id, "student": {"family": "mlp", "hidden": [32]},
            "steps": [{"kind": "distill", "epochs": 2}], **overrides}
