"""A teacher served behind an OpenAI-compatible endpoint: the engine reaches it through the worker's Unix-socket proxy
(worker/teacher_proxy.py), as the sandboxed executor does; the endpoint's URL and key stay outside."""

from __future__ import annotations

import json
import math

import pytest

import engine
from app.settings import Settings
from engine import DatasetSource, ModelSource, TeacherSource
from engine.errors import InvalidSpec
from tests.engine.helpers import RecordingReporter
from tests.support import lm
from tests.support.openai_server import OpenAIServer
from worker.teacher_proxy import EndpointRefused, TeacherProxy

pytestmark = pytest.mark.slow
KEY = "sk-deployment-secret"


@pytest.fixture()
def served(lm_teacher, tmp_path, monkeypatch):
    """(server, proxy): the shared teacher served on 127.0.0.1, the proxy's socket in a scratch directory that is
    also the working directory (the executor's view)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    settings = Settings(teacher_endpoint_hosts=["127.0.0.1"], teacher_endpoint_api_key=KEY)
    with OpenAIServer(lm_teacher.model, lm_teacher.tok, api_key=KEY) as server:
        proxy = TeacherProxy(scratch, {"url": server.url, "model": "teacher-7b", "top_logprobs": 8}, settings)
        try:
            yield server, proxy
        finally:
            proxy.close()


def _student(lm_teacher, tmp_path, tok=None):
    from engine.lm.students import derive_student

    tok = tok or lm_teacher.tok
    model = derive_student(lm_teacher.model, depth=0.5) if tok is lm_teacher.tok else lm.build_model(tok, layers=1)
    directory = lm.save_model_dir(model, tok, tmp_path / "student")
    return model, ModelSource(lm.zip_dir(directory, tmp_path / "student.zip"), "hf_transformers")


def _run(spec, proxy, datasets, models, out):
    reporter = RecordingReporter()
    result = engine.run(spec, TeacherSource(proxy.config_path, "endpoint", "causal_lm"), datasets, out, reporter,
                        device="cpu", threads=1, models=models)
    return result, reporter


def test_token_kd_from_a_served_teacher(lm_teacher, served, tmp_path):
    server, proxy = served
    initial, student = _student(lm_teacher, tmp_path)
    before = lm.perplexity(initial, lm_teacher.tok, lm_teacher.held_docs)
    text = DatasetSource(lm.write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in lm_teacher.train_docs[:12]]), "jsonl")
    held = DatasetSource(lm.write_jsonl(tmp_path / "h.jsonl", [{"text": d} for d in lm_teacher.held_docs]), "jsonl")
    spec = {"teacher": {"endpoint": {"url": server.url, "model": "teacher-7b", "top_logprobs": 8}},
            "dataset_id": "text", "eval_dataset_id": "held", "student": {"model_id": "mdl_s"}, "exports": ["hf"],
            "steps": [{"kind": "distill", "loss": {"type": "token_kd", "top_k": 8}, "epochs": 1, "batch_size": 16,
                       "max_seq_len": 64, "optimizer": {"type": "adamw", "lr": 2e-3}}]}
    result, _ = _run(spec, proxy, {"text": text, "held": held}, {"mdl_s": student}, tmp_path / "out")
    report = result.report
    # The served teacher's perplexity, from its echoed log-probabilities, is the local model's.
    assert report["teacher"]["perplexity"] == pytest.approx(lm.perplexity(lm_teacher.model, lm_teacher.tok,
                                                                          lm_teacher.held_docs), rel=1e-3)
    assert report["teacher"]["served"] == {"model": "teacher-7b"} and report["parameter_ratio"] is None
    assert report["student"]["perplexity"] < before and math.isfinite(report["student"]["kl"])
    # Every request carried the deployment's key and the spec's model; the sandbox's file names neither the URL
    # nor the key.
    assert server.requests and all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert {r["body"]["model"] for r in server.requests} == {"teacher-7b"}
    config = proxy.config_path.read_text()
    assert KEY not in config and server.url not in config and json.loads(config)["socket"] == "endpoint.sock"


def test_generate_from_a_served_teacher_then_distill(lm_teacher, served, tmp_path):
    server, proxy = served
    _, student = _student(lm_teacher, tmp_path)
    prompts = [{"prompt": " ".join(d.split()[:8])} for d in lm_teacher.train_docs[:20]]
    data = DatasetSource(lm.write_jsonl(tmp_path / "p.jsonl", prompts), "jsonl")
    spec = {"teacher": {"endpoint": {"url": server.url, "model": "teacher-7b"}}, "dataset_id": "p",
            "student": {"model_id": "mdl_s"}, "exports": [],
            "steps": [{"kind": "generate", "max_new_tokens": 16, "temperature": 0.8},
                      {"kind": "distill", "loss": {"type": "token_kd"}, "epochs": 1, "max_seq_len": 64}]}
    result, reporter = _run(spec, proxy, {"p": data}, {"mdl_s": student}, tmp_path / "out")
    records = [json.loads(line) for line in next(a for a in result.artifacts if a.kind == "dataset").path.read_text()
               .splitlines()]
    assert len(records) == 18 and all(r["completion"] for r in records)
    assert result.report["steps"][0]["data"]["generated_by_step"] == 0


def test_a_served_tokenizer_unlike_the_students_is_refused_before_training(lm_teacher, served, tmp_path):
    server, proxy = served
    _, student = _student(lm_teacher, tmp_path, tok=lm.tokenizer(vocab_size=300))
    text = DatasetSource(lm.write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in lm_teacher.train_docs[:4]]), "jsonl")
    spec = {"teacher": {"endpoint": {"url": server.url, "model": "m"}}, "dataset_id": "text",
            "student": {"model_id": "mdl_s"}, "steps": [{"kind": "distill", "loss": {"type": "token_kd"}}]}
    with pytest.raises(InvalidSpec, match="tokenizer differs"):
        _run(spec, proxy, {"text": text}, {"mdl_s": student}, tmp_path / "out")


def test_the_proxy_refuses_hosts_off_the_allow_list_and_anything_but_completions(tmp_path, served):
    with pytest.raises(EndpointRefused, match="allow-list"):
        TeacherProxy(tmp_path, {"url": "https://evil.example/v1", "model": "m"}, Settings(teacher_endpoint_hosts=["127.0.0.1"]))
    import http.client
    import socket

    server, proxy = served
    conn = http.client.HTTPConnection("x")
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(proxy.path))
    conn.request("POST", "/v1/embeddings", "{}", {"Content-Type": "application/json"})
    assert conn.getresponse().status == 404
