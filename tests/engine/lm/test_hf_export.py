"""The ``hf`` export (engine/lm/hf_export.py): a flat, deterministic zip of a Hugging Face model directory that
loads with AutoModelForCausalLM / AutoTokenizer / pipeline and matches the in-memory model; a tampered one fails."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from engine.errors import ExportFailed
from engine.lm.hf_export import PROMPT, export_hf, verify_hf
from engine.lm.students import derive_student
from tests.support import lm



@pytest.fixture(scope="module")
def llama(tok):
    return lm.build_model(tok, "llama", layers=2)


@pytest.fixture(scope="module")
def exported(llama, tok, tmp_path_factory):
    """(facts, path) of the llama's export, shared by the tests that tamper with a copy of it."""
    path = tmp_path_factory.mktemp("hf") / "model.zip"
    return export_hf(llama, tok, path), path


def _rewrite(src, dst, change):
    """``src`` zipped again as ``dst`` with ``change(name, bytes) -> bytes | None`` (None drops the member)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


def _weights(zip_path):
    with zipfile.ZipFile(zip_path) as z:
        return load_safetensors(z.read("model.safetensors"))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_export_and_verify_round_trip(tok, ids, tmp_path, architecture):
    # A derived student (fewer layers, narrower MLP): its config must describe exactly what was trained.
    model = derive_student(lm.build_model(tok, architecture, layers=4), depth=0.5, width=0.5)
    facts = export_hf(model, tok, tmp_path / "a.zip")

    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        names = z.namelist()
    assert facts == {"files": names, "bytes": (tmp_path / "a.zip").stat().st_size}
    assert names == sorted(names) and not any("/" in n for n in names)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    assert {t.dtype for t in _weights(tmp_path / "a.zip").values()} == {torch.float32}

    # Deterministic: the same model and tokenizer give the same bytes.
    export_hf(model, tok, tmp_path / "b.zip")
    assert hashlib.sha256((tmp_path / "a.zip").read_bytes()).digest() == \
        hashlib.sha256((tmp_path / "b.zip").read_bytes()).digest()

    assert model.training
    result = verify_hf(tmp_path / "a.zip", model, ids)
    assert model.training  # verify_hf compares in eval mode and gives the model back as it was
    assert result["max_abs_diff"] <= 1e-4
    assert isinstance(result["generated"], str) and result["generated"].startswith(PROMPT)
    assert len(result["generated"]) > len(PROMPT)


def test_a_model_cast_to_bfloat16_is_exported_in_bfloat16(tok, ids, tmp_path):
    model = lm.build_model(tok, "llama", layers=1).to(torch.bfloat16)
    export_hf(model, tok, tmp_path / "bf16.zip")
    assert {t.dtype for t in _weights(tmp_path / "bf16.zip").values()} == {torch.bfloat16}
    # A bfloat16 tolerance: casting the model also cast its rotary inv_freq buffer to bfloat16, while the reloaded
    # model recomputes it in float32, so the two differ by bfloat16 rounding (about 4e-3 here).
    assert verify_hf(tmp_path / "bf16.zip", model, ids, atol=2e-2)["max_abs_diff"] <= 2e-2


def test_tampered_weights_fail_verification(llama, ids, exported, tmp_path):
    _, good = exported

    def shift_one_tensor(name, data):
        if name != "model.safetensors":
            return data
        tensors = load_safetensors(data)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.5
        return save_safetensors(tensors, metadata={"format": "pt"})

    tampered = _rewrite(good, tmp_path / "tampered.zip", shift_one_tensor)
    with pytest.raises(ExportFailed, match="logits differ from the trained model's"):
        verify_hf(tampered, llama, ids)


def test_a_missing_tensor_fails_verification(llama, ids, exported, tmp_path):
    _, good = exported

    def drop_one_tensor(name, data):
        if name != "model.safetensors":
            return data
        tensors = load_safetensors(data)
        del tensors["model.layers.0.mlp.up_proj.weight"]
        return save_safetensors(tensors, metadata={"format": "pt"})

    # transformers would initialise the tensor at random and only warn.
    with pytest.raises(ExportFailed, match=r"missing_keys: model\.layers\.0\.mlp\.up_proj\.weight"):
        verify_hf(_rewrite(good, tmp_path / "missing.zip", drop_one_tensor), llama, ids)


@pytest.mark.parametrize("change, message", [
    (lambda name, data: data[:100] if name == "model.safetensors" else data, "does not load with AutoModelForCausalLM"),
    (lambda name, data: None if name == "tokenizer.json" else data, "tokenizer does not load with AutoTokenizer"),
])
def test_broken_files_fail_verification(llama, ids, exported, tmp_path, change, message):
    _, good = exported
    with pytest.raises(ExportFailed, match=message):
        verify_hf(_rewrite(good, tmp_path / "broken.zip", change), llama, ids)


def test_a_zip_with_folders_is_refused(llama, ids, exported, tmp_path):
    _, good = exported
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "nested.zip", "w") as zout:
        for name in zin.namelist():
            zout.writestr(f"model/{name}", zin.read(name))
    with pytest.raises(ExportFailed, match="flat"):
        verify_hf(tmp_path / "nested.zip", llama, ids)


def test_export_needs_the_tokenizer(llama, tmp_path):
    with pytest.raises(ExportFailed, match="needs the tokenizer"):
        export_hf(llama, None, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_the_zip_is_a_valid_archive_in_memory(exported):
    facts, path = exported
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as z:
        assert z.testzip() is None and z.namelist() == facts["files"]
