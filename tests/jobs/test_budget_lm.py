"""The budget of a causal-LM job (app/jobs/budget_lm.py): the derived student's size against the real derived model,
a 7B teacher refused with 422 budget_exceeded, a small job let through."""

from __future__ import annotations

import pytest

from app.db.models import Dataset, Model
from app.errors import BudgetExceeded
from app.jobs import budget
from app.jobs.budget_lm import estimate_lm, student_parameters
from app.settings import Settings
from jobspec import JobSpec
from jobspec.rules import with_task_defaults


def _teacher(params: int, vocab: int, hidden: int, layers: int) -> Model:
    return Model(id="mdl_t", format="hf_transformers", task="causal_lm", num_parameters=params,
                 io_schema={"hf": {"vocab_size": vocab, "hidden_size": hidden, "layers": layers}})


def _text(chars: int, rows: int = 100) -> Dataset:
    return Dataset(id="ds", format="jsonl", num_rows=rows, schema_={"records": "text", "characters": chars})


def _spec(**over) -> JobSpec:
    body = {"teacher_model_id": "mdl_t", "dataset_id": "ds", "student": {"derive": {"depth": 0.5}}, **over}
    return with_task_defaults(JobSpec.model_validate(body), "causal_lm")


def test_the_derived_student_is_sized_like_the_model_the_engine_builds():
    from engine.lm.students import derive_student
    from tests.support import lm

    tok = lm.tokenizer()
    teacher = lm.build_model(tok, "llama", layers=4, hidden=96, intermediate=256)
    params = sum(p.numel() for p in teacher.parameters())
    real = sum(p.numel() for p in derive_student(teacher, depth=0.5).parameters())
    estimate = student_parameters(_spec(), _teacher(params, len(tok), 96, 4), None)
    assert estimate == pytest.approx(real, rel=0.05)


def test_a_7b_teacher_is_refused_and_a_small_job_goes_through():
    settings = Settings(max_job_memory_bytes=16 << 30, max_job_seconds=3600)
    big = _teacher(7_000_000_000, 32_000, 4096, 32)
    with pytest.raises(BudgetExceeded) as err:
        budget.check(estimate_lm(_spec(), big, {"ds": _text(50_000_000)}, None), settings)
    assert "DISTILLERY_MAX_JOB_MEMORY_BYTES" in str(err.value.detail)
    small = estimate_lm(_spec(), _teacher(300_000, 512, 96, 4), {"ds": _text(300_000)}, None)
    assert budget.check(small, settings) is small and small.seconds < 60


def test_a_generate_step_costs_the_teacher_tokens_it_writes():
    plain = estimate_lm(_spec(), _teacher(10_000_000, 512, 256, 8), {"ds": _text(10_000, rows=1000)}, None)
    generating = estimate_lm(_spec(steps=[{"kind": "generate", "max_new_tokens": 256},
                                          {"kind": "distill", "loss": {"type": "token_kd"}}]),
                             _teacher(10_000_000, 512, 256, 8), {"ds": _text(10_000, rows=1000)}, None)
    assert generating.flops > 10 * plain.flops
