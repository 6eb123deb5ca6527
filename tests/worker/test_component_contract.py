"""The spec's tables and the engine's registries name the same components (capabilities tell the truth)."""

from __future__ import annotations


def test_every_component_the_api_accepts_is_implemented_and_vice_versa():
    import jobspec as spec
    from app.catalog.dataset_files import SUPPORTED_DATASET_FORMATS
    from app.catalog.model_files import SUPPORTED_MODEL_FORMATS
    from engine import registries

    assert set(registries["steps"].names()) == set(spec.STEP_KINDS)
    assert set(registries["losses"].names()) == set(spec.LOSSES)
    assert set(registries["students"].names()) == set(spec.STUDENT_FAMILIES)
    assert set(registries["optimizers"].names()) == set(spec.OPTIMIZERS)
    assert set(registries["exports"].names()) == set(spec.base.ALL_EXPORT_FORMATS)
    assert set(registries["teacher_formats"].names()) == set(SUPPORTED_MODEL_FORMATS)
    assert set(registries["dataset_formats"].names()) == set(SUPPORTED_DATASET_FORMATS)


def test_engine_accepts_the_defaults_the_api_fills_in():
    """A spec the API stores (defaults filled) builds in the engine."""
    from engine.pipeline.job import plan_job
    from jobspec import JobSpec

    stored = JobSpec.model_validate({"teacher_model_id": "m", "dataset_id": "d",
                                     "student": {"family": "mlp"}}).model_dump(mode="json")
    job = plan_job(stored)
    assert job.steps[0].loss.name == "kd" and job.steps[0].optimizer.name == "adamw"
