"""A causal-LM job's inputs, checked: the spec's rules against the files, the jsonl records, the held-out split,
and the student (derived, fresh, uploaded; or the uploaded student of a served teacher, whose tokenizer is checked
against the endpoint's on sample text)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jobspec
from engine import registry
from engine.errors import EngineError, InvalidDataset, InvalidSpec, Unsupported
from engine.lm import model_dir, text_data
from engine.lm.teachers import ServedTeacher
from engine.values import DatasetSource, ModelSource


def sources(job: jobspec.JobSpec, datasets: Any) -> dict[str, DatasetSource]:
    if isinstance(datasets, DatasetSource):
        return {job.dataset_id or "dataset": datasets}
    return dict(datasets or {})


def read_records(job: jobspec.JobSpec, sources: Mapping[str, DatasetSource]) -> dict[str, tuple[str, list[dict]]]:
    out = {}
    for ds_id in job.dataset_ids():
        if ds_id not in sources:
            raise InvalidSpec(f"dataset {ds_id!r} was not provided")
        src = sources[ds_id]
        if src.format != "jsonl":
            raise InvalidDataset(f"dataset {ds_id}: a causal_lm teacher trains on text; upload it as 'jsonl' "
                                 f"records (this one is {src.format})")
        try:
            out[ds_id] = text_data.read_records(Path(src.path))
        except EngineError as exc:
            raise InvalidDataset(f"dataset {ds_id}: {exc.message}") from None
    return out


def build_student(job: jobspec.JobSpec, teacher: Any, teacher_digest: str, models: Mapping[str, ModelSource] | None,
             work: Path) -> tuple[Any, dict[str, Any]]:
    from engine.lm import students

    s = job.student
    if isinstance(s, jobspec.DerivedStudent):
        model = students.derive_student(teacher, depth=s.derive.depth, width=s.derive.width)
        how = {"derive": s.derive.model_dump()}
    elif isinstance(s, jobspec.students.HFCausalLMStudent):
        model = registry.students.build(s).create_lm(teacher)
        how = {"family": "hf_causal_lm", "config": dict(s.config)}
    elif isinstance(s, jobspec.UploadedStudent):
        if not models or s.model_id not in models:
            raise InvalidSpec(f"student model {s.model_id!r} was not provided")
        directory = model_dir.unpack(Path(models[s.model_id].path), work / "student")
        if model_dir.tokenizer_digest(model_dir.load_tokenizer(directory)) != teacher_digest:
            raise InvalidSpec("the student's tokenizer differs from the teacher's: token-level KD compares "
                              "distributions over the same tokens")
        model = model_dir.load_causal_lm(directory)
        how = {"model_id": s.model_id}
    else:
        raise InvalidSpec("a causal_lm job needs a student: {\"derive\": {\"depth\": 0.5}}, "
                          "{\"family\": \"hf_causal_lm\", \"config\": {...}} or an uploaded hf_transformers model")
    return model.float().train(), {**how, **students.describe(model)}


def check_rules(job: jobspec.JobSpec, facts: jobspec.Facts) -> None:
    for problem in jobspec.conflicts(job, facts):
        raise (Unsupported if problem.unsupported else InvalidSpec)(str(problem))


def served_setup(job: jobspec.JobSpec, facts: jobspec.Facts, config: Path, models: Mapping[str, ModelSource] | None,
            work: Path, records: Mapping[str, tuple[str, list[dict]]]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """A served teacher: the uploaded student and its tokenizer, checked against the endpoint's on sample text."""
    from engine.lm import students
    from engine.lm.endpoint import EndpointTeacher

    check_rules(job, facts)
    s = job.student
    if not isinstance(s, jobspec.UploadedStudent) or not models or s.model_id not in models:
        raise InvalidSpec("a served teacher needs an uploaded student ('student': {\"model_id\": ...})")
    directory = model_dir.unpack(Path(models[s.model_id].path), work / "student")
    tok = model_dir.load_tokenizer(directory)
    student = model_dir.load_causal_lm(directory).float().train()
    endpoint = EndpointTeacher(config, tok)
    if any(isinstance(st, jobspec.DistillStep) and job.generated_for(i) is None for i, st in enumerate(job.steps)):
        texts = [r.get("text") or r.get("prompt") or "" for _, rows in records.values() for r in rows[:4]]
        endpoint.check_tokenizer([t for t in texts if t])
    return ServedTeacher(endpoint), tok, student, {"model_id": s.model_id, **students.describe(student)}


def split_records(job: jobspec.JobSpec, records: Mapping[str, tuple[str, list[dict]]]
           ) -> tuple[str, list[dict], dict[str, list[dict]], str]:
    """(kind, held-out records, training records per dataset id, where the held-out records come from)."""
    train = {k: r for k, (_, r) in records.items()}
    if job.eval_dataset_id:
        kind, val = records[job.eval_dataset_id]
        return kind, val, train, f"eval dataset {job.eval_dataset_id}"
    main_id = job.heldout_dataset_id()
    kind, rows = records[main_id]
    tr, val = text_data.split_records(rows, job.val_fraction, job.seed)
    train[main_id] = tr
    return kind, val, train, f"{len(val)} of {len(rows)} records held out (seed {job.seed})"
