"""A spec the API accepts, the engine accepts; a spec the API refuses, the engine refuses too.

Both sides validate with :class:`jobspec.JobSpec` (one definition). This test holds them to it over the
documented example and a generated set of valid and invalid specs (hypothesis): every accepted body, as
stored (``model_dump(mode="json")``), builds in the engine with the same steps and student; every refused
body is refused by the engine with ``invalid_spec``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import jobspec
from engine.errors import InvalidSpec
from engine.pipeline.job import plan_job
from tests.support.docs_examples import job_examples

# Mostly values inside every bound (so that whole specs are often valid), sometimes the bounds themselves
# and values just past them.
_mild = st.sampled_from([0.5, 1, 1.0, 2])
_wild = st.one_of(st.sampled_from([-1, 0, 1e-9, 1.0000001, 4, 16, 100, 101, 2**31 - 1, 2**31, 1e12]),
                  st.floats(min_value=-5, max_value=200, allow_nan=False))
number = st.one_of(_mild, _mild, _mild, _mild, _mild, _wild)
maybe = st.one_of(st.none(), st.just("bad"), number)

losses = st.fixed_dictionaries({"type": st.sampled_from([*jobspec.LOSSES, "focal"])},
                                optional={"temperature": number, "alpha": number, "entropy_weight": number,
                                          "label_smoothing": number, "target": st.sampled_from(["outputs", "x"]),
                                          "mse_weight": number})
optimizers = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["adam", "adamw", "sgd", "lion"]),
                                                 "lr": number, "weight_decay": number, "momentum": number})
finetune = st.fixed_dictionaries({}, optional={"epochs": number, "loss": losses, "batch_size": number,
                                               "optimizer": optimizers, "grad_clip": maybe})
gate = st.fixed_dictionaries({}, optional={"metric": st.sampled_from([*jobspec.steps.GATE_METRICS, "auc"]),
                                           "max_drop": number})
distill = st.fixed_dictionaries({"kind": st.just("distill")}, optional={
    "loss": losses, "epochs": number, "batch_size": number, "optimizer": optimizers, "grad_clip": maybe,
    "early_stopping": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "patience": number, "metric": st.sampled_from(["auto", "loss", "accuracy", "mse", "f1"])})),
    "augment": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"noise": number, "shift": number})),
    "synthesize": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"num_samples": number})),
    "coreset": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"fraction": number})),
    "input_reduction": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"components": number})),
    "dataset_id": st.one_of(st.none(), st.just("ds_2")), "gate": st.one_of(st.none(), gate)})
prune = st.fixed_dictionaries({"kind": st.just("prune")}, optional={
    "method": st.sampled_from([*jobspec.steps.PRUNE_METHODS, "lottery"]), "amount": number,
    "iterations": number, "finetune": st.one_of(st.none(), finetune), "gate": st.one_of(st.none(), gate)})
quantize = st.fixed_dictionaries({"kind": st.just("quantize")}, optional={
    "method": st.sampled_from([*jobspec.steps.QUANTIZE_METHODS, "int4"]), "calibration_rows": number,
    "mode": st.sampled_from(["dynamic", "static"]), "finetune": st.one_of(st.none(), finetune)})
students = st.one_of(
    st.none(),
    st.fixed_dictionaries({"family": st.sampled_from([*jobspec.STUDENT_FAMILIES, "vit"])},
                          optional={"hidden": st.lists(number, max_size=3), "d_model": number, "heads": number,
                                    "channels": st.lists(number, max_size=3), "depth": number, "width": number,
                                    "init": st.sampled_from(["random", "teacher", "pretrained"])}),
    st.fixed_dictionaries({"derive": st.fixed_dictionaries({}, optional={"width": number, "depth": number})}),
    st.fixed_dictionaries({"model_id": st.sampled_from(["mdl_1", ""])}),
)
specs = st.fixed_dictionaries({"teacher_model_id": st.just("mdl_t"), "dataset_id": st.sampled_from(["ds_1", "ds_1", None]),
                               "student": st.one_of(st.just({"family": "mlp"}), students)}, optional={
    "eval_dataset_id": st.one_of(st.none(), st.just("ds_3")),
    "input_spec": st.one_of(st.none(), st.fixed_dictionaries({"shape": st.lists(number, min_size=0, max_size=3)},
                                                             optional={"range": st.tuples(number, number)})),
    "steps": st.lists(st.one_of(distill, prune, quantize), min_size=0, max_size=3),
    "baseline": st.booleans(),
    "val_fraction": number,
    "exports": st.lists(st.sampled_from([*jobspec.EXPORT_FORMATS, "tflite"]), max_size=4),
    "seed": number,
    "tracking": st.one_of(st.none(), st.fixed_dictionaries({"mlflow": st.fixed_dictionaries(
        {"experiment": st.sampled_from(["digits", "", "a\nb"])},
        optional={"run_name": st.sampled_from([None, "r", ""]),
                  "register": st.fixed_dictionaries({"name": st.sampled_from(["student", "a/b", ".x", " x"])})})})),
})


def _same_job(body: dict[str, Any]) -> bool:
    """The API's verdict on ``body`` and the engine's agree; returns whether it was accepted."""
    try:
        stored = jobspec.JobSpec.model_validate(body).model_dump(mode="json")
    except ValidationError:
        try:
            plan_job(body)
        except InvalidSpec:
            return False
        raise AssertionError(f"the API refuses this spec but the engine accepts it: {body}") from None
    job = plan_job(stored)  # must not raise: the API accepted it
    assert [s.name for s in job.steps] == [s["kind"] for s in stored["steps"]]
    assert (job.student is None) == (stored["student"] is None)
    assert job.spec.model_dump(mode="json") == stored  # the stored form is a fixed point
    return True


@pytest.mark.parametrize("where,body", [("JobSpec example", jobspec.JobSpec.model_config["json_schema_extra"]
                                           ["examples"][0]), *job_examples()])
def test_the_documented_examples_are_accepted_by_both(where, body):
    assert _same_job(body), where


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_api_and_engine_agree_on_generated_specs(body):
    _same_job(body)


def test_the_generator_reaches_both_verdicts():
    """The property above is only meaningful if generated specs are both accepted and refused."""
    verdicts: set[bool] = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(specs)
    def collect(body):
        verdicts.add(_same_job(body))

    collect()
    assert verdicts == {True, False}
