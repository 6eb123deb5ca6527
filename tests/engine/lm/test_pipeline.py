"""A whole causal-LM job in this process (engine.run): derive a 2-layer student from a trained 4-layer Llama teacher,
distill it with token-level KD on text records, train its baseline twin on the data alone, export it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import engine
from engine import DatasetSource, TeacherSource
from engine.errors import InvalidDataset, InvalidModel, InvalidSpec
from tests.engine.helpers import RecordingReporter
from tests.support import lm

pytestmark = pytest.mark.slow


def _spec(**over):
    spec = {"teacher_model_id": "mdl_teacher", "dataset_id": "ds_text", "student": {"derive": {"depth": 0.5}},
            "steps": [{"kind": "distill", "loss": {"type": "token_kd", "top_k": 32}, "epochs": 3, "batch_size": 16,
                       "max_seq_len": 64, "optimizer": {"type": "adamw", "lr": 2e-3, "weight_decay": 0.01},
                       "schedule": {"type": "cosine", "warmup_fraction": 0.05}}],
            "exports": ["hf"], "val_fraction": 0.1, "seed": 0}
    spec.update(over)
    return spec


def _data(tmp_path: Path, docs: list[str], name: str = "text.jsonl") -> DatasetSource:
    return DatasetSource(lm.write_jsonl(tmp_path / name, [{"text": d} for d in docs]), "jsonl")


def _run(spec, teacher, data, out, models=None, held=None):
    reporter = RecordingReporter()
    datasets = {"ds_text": data, **({"ds_held": held} if held is not None else {})}
    result = engine.run(spec, TeacherSource(teacher.zip, "hf_transformers", "causal_lm"), datasets, out,
                        reporter, device="cpu", threads=1, models=models)
    return result, reporter


def test_a_derived_student_is_distilled_reported_and_ships_as_hf(lm_teacher, tmp_path):
    """Held-out text the teacher never saw (eval_dataset_id). The quality bar (below the baseline twin, within 1.3x
    the teacher) is held by the end-to-end test through the service (tests/integration/test_lm_e2e.py), on the whole
    corpus; this one checks the job's shape on a slice, fast."""
    data, held = _data(tmp_path, lm_teacher.train_docs[:16]), _data(tmp_path, lm_teacher.held_docs, "held.jsonl")
    spec = _spec(baseline=True, eval_dataset_id="ds_held")
    spec["steps"][0]["epochs"] = 1
    result, reporter = _run(spec, lm_teacher, data, tmp_path / "out", held=held)
    report = result.report
    teacher_ppl, student_ppl = report["teacher"]["perplexity"], report["student"]["perplexity"]
    assert student_ppl < 3 * teacher_ppl and report["baseline"]["perplexity"] > 0
    assert set(report["teacher_gain"]) >= {"perplexity", "agreement", "kl"}
    assert report["architecture"]["layers"] == 2 and report["parameter_ratio"] > 1.2
    assert report["student"]["latency_ms"]["batch_1"] > 0 and len(report["samples"]) == 3
    assert {"load", "teacher_outputs", "step_finished", "baseline", "export", "report"} <= set(reporter.event_types())
    hf = next(a for a in result.artifacts if a.format == "hf")
    # The shipped files, loaded as a user would, give the perplexity the report states.
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(hf.path) as z:
        z.extractall(unpacked)
    from transformers import AutoModelForCausalLM

    shipped = AutoModelForCausalLM.from_pretrained(unpacked, local_files_only=True).eval()
    assert shipped.config.num_hidden_layers == 2
    recomputed = lm.perplexity(shipped, lm_teacher.tok, lm_teacher.held_docs)
    assert recomputed == pytest.approx(student_ppl, rel=0.05)
    card = next(a for a in result.artifacts if a.kind == "model_card").path.read_text()
    assert "Generation samples" in card and "baseline" in card
    assert json.loads(next(a for a in result.artifacts if a.kind == "report").path.read_text())["data"]["task"] == \
        "causal_lm"


def test_prompt_completion_records_train_on_completions_only(lm_teacher, tmp_path):
    docs = lm_teacher.train_docs[:30]
    records = [{"prompt": d[:80], "completion": d[80:300]} for d in docs]
    data = DatasetSource(lm.write_jsonl(tmp_path / "pc.jsonl", records), "jsonl")
    spec = _spec(student={"family": "hf_causal_lm", "config": {"layers": 1, "hidden_size": 64, "heads": 4,
                                                                "kv_heads": 2, "intermediate_size": 128}})
    spec["steps"][0].update(epochs=1, max_seq_len=128)
    result, _ = _run(spec, lm_teacher, data, tmp_path / "out")
    assert result.report["architecture"]["layers"] == 1
    assert result.report["data"]["record_kind"] == {"ds_text": "prompt_completion"}


def test_a_mixed_or_broken_jsonl_fails_fast_naming_the_line(lm_teacher, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a b c"}\n{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(InvalidDataset, match="line 2"):
        _run(_spec(), lm_teacher, DatasetSource(path, "jsonl"), tmp_path / "out")


def test_a_classic_loss_on_a_language_model_is_refused(lm_teacher, tmp_path):
    data = _data(tmp_path, lm_teacher.train_docs[:5])
    spec = _spec()
    spec["steps"][0]["loss"] = {"type": "kd"}
    with pytest.raises(InvalidSpec, match="token_kd"):
        _run(spec, lm_teacher, data, tmp_path / "out")


def test_an_archive_with_code_or_pickles_is_refused_before_loading(lm_teacher, tmp_path):
    data = _data(tmp_path, lm_teacher.train_docs[:5])
    for extra, why in (({"modeling_evil.py": b"import os"}, "is code"),
                       ({"pytorch_model.bin": b"\x80\x04K\x01."}, "pickle")):
        bad = lm.zip_dir(lm_teacher.directory, tmp_path / "bad.zip", extra=extra)
        teacher = type(lm_teacher)(lm_teacher.tok, None, lm_teacher.directory, bad, [], [])
        with pytest.raises(InvalidModel, match=why):
            _run(_spec(), teacher, data, tmp_path / "out")
    config = json.loads((lm_teacher.directory / "config.json").read_text())
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in lm_teacher.directory.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    teacher = type(lm_teacher)(lm_teacher.tok, None, remote, lm.zip_dir(remote, tmp_path / "remote.zip"), [], [])
    with pytest.raises(InvalidModel, match="auto_map"):
        _run(_spec(), teacher, data, tmp_path / "out")
    assert torch.get_num_threads() >= 1


def _prompts(docs: list[str], n: int) -> list[dict]:
    """Prompts cut from the documents: the opening words of each paragraph-sized piece."""
    out = []
    for d in docs:
        words = d.split()
        for i in range(0, len(words) - 12, 60):
            out.append({"prompt": " ".join(words[i:i + 8])})
    return out[:n]


def test_generate_then_distill_from_prompts_only(lm_teacher, tmp_path):
    """Sequence-level KD: the teacher completes prompts, the student distills on the completions."""
    data = DatasetSource(lm.write_jsonl(tmp_path / "p.jsonl", _prompts(lm_teacher.train_docs, 48)), "jsonl")
    spec = _spec(student={"family": "hf_causal_lm", "config": {"layers": 1}}, baseline=True)
    spec["steps"] = [{"kind": "generate", "max_new_tokens": 24, "temperature": 0.7},
                     {**spec["steps"][0], "epochs": 1}]
    result, reporter = _run(spec, lm_teacher, data, tmp_path / "out")
    gen = next(a for a in result.artifacts if a.kind == "dataset")
    records = [json.loads(line) for line in gen.path.read_text().splitlines()]
    held_out = round(48 * 0.1)
    assert len(records) == 48 - held_out and all(r["completion"] for r in records[:5])
    assert "generate" in reporter.event_types()
    step = result.report["steps"][0]
    assert step["index"] == 1 and step["data"]["generated_by_step"] == 0
    assert "completed by the teacher" in result.report["data"]["val_source"]
    assert result.report["baseline"]["perplexity"] > 0  # the twin trains on the same completions


def test_on_policy_jsd_samples_from_the_student(lm_teacher, tmp_path):
    data = _data(tmp_path, lm_teacher.train_docs[:6])
    spec = _spec()
    spec["steps"][0].update(epochs=1, on_policy=0.5, loss={"type": "token_kd", "divergence": "jsd", "beta": 0.5})
    result, _ = _run(spec, lm_teacher, data, tmp_path / "out")
    info = result.report["steps"][0]["data"]
    assert info["on_policy"] == 0.5 and 0 < info["on_policy_batches"]
    assert result.report["student"]["perplexity"] < 200


def test_two_devices_train_the_same_student_as_one(lm_teacher, tmp_path):
    """"devices": 2 runs the step data-parallel (gloo on the CPU): the same held-out perplexity as one process."""
    data = _data(tmp_path, lm_teacher.train_docs[:4])
    spec = _spec(student={"family": "hf_causal_lm", "config": {"layers": 1, "hidden_size": 32, "heads": 4,
                                                                "kv_heads": 2, "intermediate_size": 64}})
    spec["steps"][0].update(epochs=1, batch_size=8)
    one, _ = _run(spec, lm_teacher, data, tmp_path / "one")
    two, _ = _run({**spec, "devices": 2}, lm_teacher, data, tmp_path / "two")
    assert two.report["student"]["perplexity"] == pytest.approx(one.report["student"]["perplexity"], rel=1e-3)


def test_prune_and_quantize_a_distilled_student(lm_teacher, tmp_path):
    """distill → prune 50 % of the MLP units (Wanda-ranked, KD fine-tune) → dynamic int8: each step one row."""
    data = _data(tmp_path, lm_teacher.train_docs[:8])
    spec = _spec()
    spec["steps"][0]["epochs"] = 1
    spec["steps"] += [{"kind": "prune", "method": "channel", "amount": 0.5,
                       "finetune": {"epochs": 1, "loss": {"type": "token_kd"}, "batch_size": 16}},
                      {"kind": "quantize", "method": "dynamic_int8"}]
    result, _ = _run(spec, lm_teacher, data, tmp_path / "out")
    distilled, pruned, quantized = result.report["steps"]
    assert pruned["prune"]["intermediate_after"] == pruned["prune"]["intermediate_before"] // 2
    assert pruned["num_parameters"] < distilled["num_parameters"]
    assert quantized["size_bytes"] < 0.5 * pruned["size_bytes"]
    assert quantized["perplexity"] < 1.05 * pruned["perplexity"]  # dynamic int8 keeps perplexity within 5 %
    assert result.report["architecture"]["intermediate_size"] == pruned["prune"]["intermediate_after"]


def test_a_broken_gate_ships_the_last_step_that_passed(lm_teacher, tmp_path):
    from engine.errors import QualityGateFailed

    data = _data(tmp_path, lm_teacher.train_docs[:6])
    spec = _spec()
    spec["steps"][0]["epochs"] = 1
    spec["steps"] += [{"kind": "prune", "method": "channel", "amount": 0.9,
                       "gate": {"metric": "perplexity", "max_drop": 0.01}}]
    with pytest.raises(QualityGateFailed, match="perplexity rose") as err:
        _run(spec, lm_teacher, data, tmp_path / "out")
    report = err.value.result.report
    assert report["gate"]["failed_step"] == 1 and report["steps"][1]["gate"]["passed"] is False
    assert report["student"]["perplexity"] == report["steps"][0]["perplexity"]  # the distilled one ships
    hf = next(a for a in err.value.result.artifacts if a.format == "hf")
    assert hf.path.exists()
    spec["steps"] = spec["steps"][:1]
    spec["steps"][0]["gate"] = {"metric": "agreement", "max_drop": 0.0}
    with pytest.raises(QualityGateFailed, match="agreement dropped") as err:
        _run(spec, lm_teacher, data, tmp_path / "out2")
    assert err.value.result.report["student"] is None
    assert not [a for a in err.value.result.artifacts if a.kind == "student"]
