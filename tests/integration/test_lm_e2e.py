"""Generative language models through the real service: a Llama teacher trained in the test on the CPython
documentation, uploaded as a zipped Hugging Face directory, distilled into half its layers with token-level KD by a
real worker in the sandboxed executor; the downloaded exports are checked the way their users would load them."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from tests.support import lm
from tests.support.flow import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _upload_model(http, content: bytes, **fields):
    return http.post("/v1/models", files={"file": ("model.zip", content)},
                     data={"name": "lm", "task": "causal_lm", **fields})


def _dataset(http, records: list[dict]) -> str:
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    r = http.post("/v1/datasets", files={"file": ("d.jsonl", body)}, data={"name": "text", "format": "jsonl"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _files(http, job_id: str) -> dict[str, bytes]:
    arts = http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    return {a["filename"]: http.get(f"/v1/artifacts/{a['id']}/content").content for a in arts}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return lm.shared_teacher(tmp_path_factory)


def test_distill_a_causal_lm_into_half_its_layers_and_use_every_export(http, teacher, tmp_path):
    directory, archive = teacher
    r = _upload_model(http, archive.read_bytes())
    assert r.status_code == 201, r.text
    facts = r.json()["io_schema"]["hf"]
    assert facts["model_type"] == "llama" and facts["layers"] == 4 and facts["vocab_size"] == 512
    # The student distills on a third of the text the teacher learnt from: the data alone is not enough, the
    # teacher's distributions carry the rest (measured: teacher 17.5, KD 19.4, its data-only twin 21.4).
    train, held = lm.split_documents()
    body = {"teacher_model_id": r.json()["id"], "dataset_id": _dataset(http, [{"text": d} for d in train[:24]]),
            "eval_dataset_id": _dataset(http, [{"text": d} for d in held]),
            "student": {"derive": {"depth": 0.5}}, "baseline": True, "exports": ["hf", "gguf", "onnx"],
            "steps": [{"kind": "distill", "loss": {"type": "token_kd", "top_k": 32}, "epochs": 3, "batch_size": 16,
                       "max_seq_len": 64, "optimizer": {"type": "adamw", "lr": 2e-3, "weight_decay": 0.01}}]}
    on_policy = {**body, "exports": ["hf"],
                 "steps": [{**body["steps"][0], "on_policy": 0.5,
                            "loss": {"type": "token_kd", "divergence": "jsd", "beta": 0.5, "top_k": 32}}]}
    quantized = {**body, "baseline": False, "exports": [],
                 "steps": [{**body["steps"][0], "epochs": 1}, {"kind": "quantize", "method": "dynamic_int8"}]}
    jobs = [http.post("/v1/jobs", json=b) for b in (body, on_policy, quantized)]
    assert all(j.status_code == 202 for j in jobs), [j.text for j in jobs]
    quantized_job = jobs.pop()
    assert jobs[0].json()["spec"]["steps"][0]["schedule"]["warmup_fraction"] == 0.05  # the causal_lm defaults filled

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    for job in jobs:  # forward KL off-policy, then GKD's JSD with on-policy λ = 0.5
        final = wait_for(http, job.json()["id"], timeout=420)
        assert final["status"] == "succeeded", final["error"]
        files = _files(http, final["id"])
        report = json.loads(files["report.json"])
        # The student as its users load it: transformers from the downloaded zip, perplexity recomputed here.
        unpacked = tmp_path / final["id"]
        zipfile.ZipFile(io.BytesIO(files["student-hf.zip"])).extractall(unpacked)
        student = AutoModelForCausalLM.from_pretrained(unpacked, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(unpacked, local_files_only=True)
        assert student.config.num_hidden_layers == 2
        ppl = lm.perplexity(student, tok, held)
        assert ppl < report["baseline"]["perplexity"], (ppl, report["baseline"])
        assert ppl < 1.3 * report["teacher"]["perplexity"], (ppl, report["teacher"])
    assert report["steps"][0]["data"]["on_policy_batches"] > 0
    final = wait_for(http, quantized_job.json()["id"], timeout=420)
    assert final["status"] == "succeeded", final["error"]
    distilled, int8 = json.loads(_files(http, final["id"])["report.json"])["steps"]
    assert int8["perplexity"] < 1.05 * distilled["perplexity"] and int8["size_bytes"] < 0.6 * distilled["size_bytes"]
    files = _files(http, jobs[0].json()["id"])  # the first job's gguf and onnx, against its own hf files
    student = AutoModelForCausalLM.from_pretrained(tmp_path / jobs[0].json()["id"], local_files_only=True).eval()
    text = pipeline("text-generation", model=student, tokenizer=tok, device="cpu")("The", max_new_tokens=5)
    assert text[0]["generated_text"].startswith("The")

    # GGUF: read back with llama.cpp's own reader, every tensor of a 2-layer Llama present.
    import gguf

    names = {t.name for t in gguf.GGUFReader(_write(tmp_path / "s.gguf", files["student-f16.gguf"])).tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    assert {f"blk.{i}.{p}.weight" for i in (0, 1) for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                              "ffn_up", "ffn_down", "attn_norm", "ffn_norm")} <= names
    assert gguf.GGUFReader(_write(tmp_path / "q.gguf", files["student-q8_0.gguf"])).tensors

    # ONNX: onnxruntime against the downloaded transformers model's logits.
    import onnxruntime as ort
    import torch

    ids = lm.blocks(tok, held[:1], 32)[:2]
    sess = ort.InferenceSession(files["student.onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
    with torch.no_grad():
        want = student(input_ids=ids).logits.numpy()
    assert np.abs(got - want).max() < 1e-3
    assert "Generation samples" in files["model_card.md"].decode()


def _write(path, content: bytes):
    path.write_bytes(content)
    return str(path)


def test_code_pickles_remote_code_and_foreign_vocabularies_are_refused(http, teacher, tmp_path):
    directory, archive = teacher
    for extra, why in (({"modeling_llama.py": b"import os"}, "is code"),
                       ({"pytorch_model.bin": b"\x80\x04K\x01."}, "pickle")):
        r = _upload_model(http, lm.zip_dir(directory, tmp_path / "bad.zip", extra=extra).read_bytes())
        assert r.status_code == 422 and why in r.json()["detail"], r.text
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in directory.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    r = _upload_model(http, lm.zip_dir(remote, tmp_path / "remote.zip").read_bytes())
    assert r.status_code == 422 and "auto_map" in r.json()["detail"], r.text

    # A student with another tokenizer: refused before any training, naming why.
    other_tok = lm.tokenizer(vocab_size=300)
    other = lm.save_model_dir(lm.build_model(other_tok, layers=1, hidden=32, intermediate=64), other_tok,
                              tmp_path / "other")
    teacher_id = _upload_model(http, archive.read_bytes()).json()["id"]
    student = _upload_model(http, lm.zip_dir(other, tmp_path / "other.zip").read_bytes())
    assert student.status_code == 201, student.text
    ds = _dataset(http, [{"text": d} for d in lm.documents(limit=3)])
    r = http.post("/v1/jobs", json={"teacher_model_id": teacher_id, "dataset_id": ds,
                                    "student": {"model_id": student.json()["id"]}})
    assert r.status_code == 422 and "tokenizer" in r.json()["detail"], r.text
    # A causal_lm upload in another format, and an LM archive declared as a classifier.
    r = http.post("/v1/models", files={"file": ("m.zip", archive.read_bytes())},
                  data={"name": "lm", "task": "classification"})
    assert r.status_code == 422 and "causal_lm" in r.json()["detail"], r.text


def test_a_served_teacher_distills_through_generate_and_token_kd(http, teacher, tmp_path):
    """The teacher behind an OpenAI-compatible server started here; the worker's proxy is the sandbox's way to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.lm.students import derive_student
    from tests.support.backends import SERVED_TEACHER_KEY
    from tests.support.openai_server import OpenAIServer

    directory, _ = teacher
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    initial = derive_student(model, depth=0.5)
    student_dir = lm.save_model_dir(initial, tok, tmp_path / "student")
    r = _upload_model(http, lm.zip_dir(student_dir, tmp_path / "student.zip").read_bytes())
    assert r.status_code == 201, r.text
    train, held = lm.split_documents()
    prompts = _dataset(http, [{"prompt": " ".join(d.split()[i:i + 8])} for d in train[:20] for i in (0, 40)])
    text = _dataset(http, [{"text": d} for d in train[:24]])
    held_id = _dataset(http, [{"text": d} for d in held])
    with OpenAIServer(model, tok, api_key=SERVED_TEACHER_KEY) as server:
        endpoint = {"url": server.url, "model": "teacher-7b", "top_logprobs": 8}
        body = {"teacher": {"endpoint": endpoint}, "dataset_id": prompts, "eval_dataset_id": held_id,
                "student": {"model_id": r.json()["id"]}, "exports": ["hf"],
                "steps": [{"kind": "generate", "max_new_tokens": 24, "temperature": 0.8},
                          {"kind": "distill", "loss": {"type": "token_kd", "top_k": 8}, "epochs": 1,
                           "batch_size": 16, "max_seq_len": 64},
                          {"kind": "distill", "dataset_id": text, "loss": {"type": "token_kd", "top_k": 8},
                           "epochs": 1, "batch_size": 16, "max_seq_len": 64}]}
        refused = http.post("/v1/jobs", json={**body, "teacher": {"endpoint": {**endpoint,
                                                                                "url": "https://evil.example/v1"}}})
        assert refused.status_code == 422 and refused.json()["code"] == "endpoint_not_allowed", refused.text
        job = http.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        final = wait_for(http, job.json()["id"], timeout=420)
        assert final["status"] == "succeeded", final["error"]
        assert all(req["headers"]["Authorization"] == f"Bearer {SERVED_TEACHER_KEY}" for req in server.requests)
    files = _files(http, final["id"])
    report = json.loads(files["report.json"])
    assert report["teacher"]["served"] == {"model": "teacher-7b"}
    assert len(files["generated-step0.jsonl"].splitlines()) == 40  # every prompt (the held-out text is its own)
    shipped = tmp_path / "shipped"
    zipfile.ZipFile(io.BytesIO(files["student-hf.zip"])).extractall(shipped)
    student = AutoModelForCausalLM.from_pretrained(shipped, local_files_only=True).eval()
    assert lm.perplexity(student, tok, held) < lm.perplexity(initial.eval(), tok, held)
