"""A zipped Hugging Face model directory is checked before it is stored or inspected: code, remote code, pickles and
oversized configs are refused with the reason (the API never opens the weights; the sandbox does)."""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest

from tests.support.api import upload

CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).encode()


def _zip(members: dict[str, bytes], stored: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("members,reason", [
    ({"config.json": CONFIG, "model.safetensors": b"x", "modeling_llama.py": b"import os"}, "is code"),
    ({"config.json": CONFIG, "model.safetensors": b"x", "pytorch_model.bin": b"\x80\x04K\x01."}, "pickle"),
    ({"config.json": json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "m.M"}}).encode(),
      "model.safetensors": b"x"}, "auto_map"),
    ({"my-model/config.json": CONFIG, "my-model/tokenizer.json": b"{}"}, "safetensors"),
    ({"config.json": b"{not json", "model.safetensors": b"x"}, "not valid JSON"),
    ({"config.json": json.dumps({"architectures": []}).encode(), "model.safetensors": b"x"}, "model_type"),
])
def test_an_hf_archive_that_is_not_data_only_is_refused_before_inspection(client, make_key, members, reason):
    r = upload(client, make_key("hf-refuse"), _zip(members), filename="model.zip", task="causal_lm")
    assert r.status_code == 422 and reason in r.json()["detail"], r.text


def test_an_oversized_config_is_refused_without_reading_it(client, make_key):
    big = {"config.json": os.urandom(17 * 1024 * 1024), "model.safetensors": b"x"}
    r = upload(client, make_key("hf-big"), _zip(big, stored=True), filename="model.zip", task="causal_lm")
    assert r.status_code == 422 and "larger than 16 MiB" in r.json()["detail"], r.text
