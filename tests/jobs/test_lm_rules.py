"""The causal_lm rules of the job spec (jobspec.rules), checked by the API before 202 and by the engine at start."""

from __future__ import annotations

import pytest

from jobspec import Facts, JobSpec, conflicts
from jobspec.rules import with_task_defaults

LM = Facts(task="causal_lm", teacher_format="hf_transformers", labelled={"ds": True}, tokenizers={"t": "abc"},
           formats={"ds": "jsonl"}, kinds={"ds": "text"})


def _spec(task: str = "causal_lm", **body) -> JobSpec:
    raw = {"teacher_model_id": "t", "dataset_id": "ds", "student": {"derive": {"depth": 0.5}}, **body}
    return with_task_defaults(JobSpec.model_validate(raw), task)


def _problems(spec: JobSpec, facts: Facts = LM) -> list[str]:
    return [str(c) for c in conflicts(spec, facts)]


def test_a_language_model_gets_its_own_defaults_where_the_request_is_silent():
    spec = _spec()
    step = spec.steps[0]
    assert spec.exports == ["hf"] and step.loss.type == "token_kd" and step.batch_size == 8
    assert step.optimizer.lr == 5e-4 and step.schedule.warmup_fraction == 0.05
    assert spec.student.derive.width == 1.0
    assert _problems(spec) == []
    named = _spec(exports=["gguf"], steps=[{"kind": "distill", "loss": {"type": "token_kd"}, "batch_size": 2}])
    assert named.exports == ["gguf"] and named.steps[0].batch_size == 2  # what the request names is kept
    classic = _spec("classification")
    assert classic.exports == ["torchscript", "onnx", "safetensors"] and classic.steps[0].loss.type == "kd"


@pytest.mark.parametrize("body,where", [
    ({"steps": [{"kind": "distill", "loss": {"type": "kd"}}]}, "steps[0].loss"),
    ({"exports": ["torchscript"]}, "exports"),
    ({"student": {"family": "mlp"}}, "student"),
    ({"steps": [{"kind": "distill", "hints": [{"teacher": "x"}]}]}, "steps[0].hints"),
    ({"steps": [{"kind": "distill"}, {"kind": "prune", "method": "magnitude"}]}, "steps[1].method"),
    ({"steps": [{"kind": "distill"}, {"kind": "quantize", "method": "static_int8"}]}, "steps[1].method"),
])
def test_what_a_language_model_cannot_take_is_named(body, where):
    assert any(p.startswith(where) for p in _problems(_spec(**body))), _problems(_spec(**body))


def test_text_data_and_lm_options_stay_with_language_models():
    classic = Facts(task="classification", teacher_format="onnx", labelled={"ds": True}, formats={"ds": "jsonl"})
    spec = _spec("classification", student={"family": "mlp"}, devices=2,
                 steps=[{"kind": "distill", "max_seq_len": 512}])
    problems = _problems(spec, classic)
    assert any("jsonl" in p for p in problems) and any(p.startswith("devices") for p in problems)
    assert any(p.startswith("steps[0].max_seq_len") for p in problems)
    assert any("hf_transformers" in p for p in _problems(_spec(), Facts("classification", "hf_transformers")))


def test_generate_needs_prompts_and_a_foreign_tokenizer_is_refused():
    gen = _spec(steps=[{"kind": "generate"}, {"kind": "distill"}])
    assert any("prompt" in p for p in _problems(gen))  # the dataset holds text records
    prompts = Facts(**{**LM.__dict__, "kinds": {"ds": "prompt"}, "labelled": {"ds": False}})
    assert _problems(_spec(steps=[{"kind": "generate"}, {"kind": "distill"}], baseline=True), prompts) == []
    student = _spec(student={"model_id": "s"})
    assert any("tokenizer" in p for p in _problems(student, Facts(**{**LM.__dict__, "tokenizers": {"t": "a", "s": "b"}})))
    assert _problems(student, Facts(**{**LM.__dict__, "tokenizers": {"t": "a", "s": "a"}})) == []
    onnx = Facts(**{**LM.__dict__, "model_formats": {"s": "onnx"}})
    assert any("hf_transformers" in p for p in _problems(student, onnx))
