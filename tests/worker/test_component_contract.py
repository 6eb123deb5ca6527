"""The API's spec tables and the engine's registries name the same components (capabilities tell the truth)."""

from __future__ import annotations


def test_every_component_the_api_accepts_is_implemented_and_vice_versa():
    from app.catalog.dataset_files import SUPPORTED_DATASET_FORMATS
    from app.catalog.model_files import SUPPORTED_MODEL_FORMATS
    import jobspec as spec
    from engine import registries

    assert set(registries["steps"].names()) == set(spec.STEP_KINDS)
    assert set(registries["losses"].names()) == set(spec.LOSSES)
    assert set(registries["students"].names()) == set(spec.STUDENT_FAMILIES)
    assert set(registries["optimizers"].names()) == set(spec.OPTIMIZERS)
    assert set(registries["exports"].names()) == set(spec.EXPORT_FORMATS)
    assert set(registries["teacher_formats"].names()) == set(SUPPORTED_MODEL_FORMATS)
    assert set(registries["dataset_formats"].names()) == set(SUPPORTED_DATASET_FORMATS)


def test_engine_accepts_the_defaults_the_api_fills_in():
    """A spec the API stores (defaults filled) must build in the engine's typed configs without complaint."""
    from jobspec import JobSpec
    from engine import registries

    stored = JobSpec.model_validate({"teacher_model_id": "m", "dataset_id": "d",
                                     "student": {"family": "mlp"}}).model_dump(mode="json")
    registries["students"].build(stored["student"], where="student")
    step = stored["steps"][0]
    registries["losses"].build(step["loss"], where="steps[0].loss")
    opt = dict(step["optimizer"])
    registries["optimizers"].build(opt, where="steps[0].optimizer")


def test_loss_task_rules_agree_so_the_api_refuses_what_the_engine_would():
    from jobspec.rules import LOSS_TASKS
    from engine import registries

    engine_tasks = {name: set(registries["losses"].get(name).tasks) for name in registries["losses"].names()}
    assert engine_tasks == LOSS_TASKS
