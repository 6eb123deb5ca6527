"""POST/GET/DELETE /v1/models: format detection, safe refusal of pickles and junk, metadata."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile

import pytest

from tests.support.api import Payload, upload


@pytest.mark.slow  # the sandboxed inspector loads a real TorchScript model (python + torch)
def test_torchscript_upload_detects_format_and_counts_parameters(client, make_key, teacher_files):
    h = make_key("models-a")
    content = teacher_files["torchscript"].read_bytes()
    r = upload(client, h, content, filename="teacher.pt")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == "torchscript" and body["task"] == "classification"
    # 64·256+256 + 256·256+256 + 256·10+10
    assert body["num_parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert body["sha256"] == hashlib.sha256(content).hexdigest() and body["size_bytes"] == len(content)
    assert body["id"].startswith("mdl_")
    assert client.get(f"/v1/models/{body['id']}", headers=h).json()["sha256"] == body["sha256"]


def test_onnx_upload_counts_initializers(client, make_key, teacher_files):
    r = upload(client, make_key("models-b"), teacher_files["onnx"].read_bytes(), filename="t.onnx")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "onnx"
    assert r.json()["num_parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def test_claimed_format_must_match_content(client, make_key, teacher_files):
    r = upload(client, make_key("models-c"), teacher_files["torchscript"].read_bytes(), format="onnx")
    assert r.status_code == 422
    assert "torchscript" in r.json()["detail"]


def _torch_save_like_zip(pickled: bytes) -> bytes:
    # The zip layout torch.save writes: <name>/data.pkl, <name>/version, <name>/data/...
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    return buf.getvalue()


def _torchscript_like_zip(pickled: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/constants.pkl", pickle.dumps(()))
        zf.writestr("archive/code/__torch__/m.py", "def forward(self): pass\n")
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.mark.parametrize("wrap,expect", [
    (lambda p: p, "pickle"),
    (_torch_save_like_zip, "unpickling"),
    (_torchscript_like_zip, "outside TorchScript"),
])
def test_malicious_pickles_are_refused_and_never_executed(client, make_key, tmp_path, wrap, expect):
    marker = tmp_path / "pwned"
    r = upload(client, make_key("models-evil"), wrap(pickle.dumps(Payload(marker))))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert expect in r.json()["detail"]
    assert "torch.jit.save" in r.json()["detail"] or "TorchScript" in r.json()["detail"]
    assert not marker.exists(), "the pickle payload ran"


def test_full_module_torch_save_is_refused_with_how_to(client, make_key, tmp_path):
    import torch

    path = tmp_path / "full.pt"
    torch.save(torch.nn.Linear(4, 2), path)
    r = upload(client, make_key("models-d"), path.read_bytes())
    assert r.status_code == 422
    assert "whole nn.Module" in r.json()["detail"] and "torch.jit.save" in r.json()["detail"]


def test_state_dict_torch_save_is_refused(client, make_key, tmp_path):
    import torch

    path = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    r = upload(client, make_key("models-e"), path.read_bytes())
    assert r.status_code == 422 and "state_dict" in r.json()["detail"]


def test_junk_onnx_is_refused(client, make_key):
    r = upload(client, make_key("models-f"), b"\x08\x07this is not a protobuf at all" * 10, filename="m.onnx")
    assert r.status_code == 422
    assert "cannot be loaded" in r.json()["detail"]
    r = upload(client, make_key("models-f"), b"hello world, not a model", filename="m.onnx")
    assert r.status_code == 422 and "not a recognised model file" in r.json()["detail"]


def test_truncated_torchscript_is_refused(client, make_key, teacher_files):
    content = teacher_files["torchscript"].read_bytes()
    r = upload(client, make_key("models-g"), content[: len(content) // 2])
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_model_file"


def test_empty_file_and_missing_fields(client, make_key):
    h = make_key("models-h")
    assert upload(client, h, b"").status_code == 422
    r = client.post("/v1/models", headers=h, files={"file": ("x", b"abc")})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "name"


def test_unknown_form_field_is_rejected(client, make_key, teacher_files):
    r = upload(client, make_key("models-i"), teacher_files["onnx"].read_bytes(), colour="blue")
    assert r.status_code == 422 and "colour" in r.json()["detail"]


def test_list_paginates_newest_first_and_delete(client, make_key, teacher_files):
    h = make_key("models-list")
    ids = [upload(client, h, teacher_files["onnx"].read_bytes(), name=f"m{i}").json()["id"] for i in range(3)]
    page1 = client.get("/v1/models?limit=2", headers=h).json()
    assert [m["id"] for m in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = client.get(f"/v1/models?limit=2&after={page1['next_cursor']}", headers=h).json()
    assert [m["id"] for m in page2["data"]] == [ids[0]] and not page2["has_more"] and page2["next_cursor"] is None
    assert client.delete(f"/v1/models/{ids[0]}", headers=h).status_code == 204
    assert client.get(f"/v1/models/{ids[0]}", headers=h).status_code == 404
    assert client.get("/v1/models?limit=0", headers=h).status_code == 422
    assert client.get("/v1/models?after=garbage", headers=h).json()["code"] == "invalid_cursor"


def test_upload_size_limit_gives_413(client, make_key, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 1000)
    r = upload(client, make_key("models-big"), b"\x08" * 5000)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_a_tenant_re_uploading_the_same_file_is_not_inspected_again(client, make_key, teacher_files, monkeypatch):
    """Same bytes, same declared format and architecture, same tenant: the earlier inspection's findings; another
    tenant's upload of the same file, or a different declared format, is inspected on its own."""
    from app.catalog import service

    inspected = []
    real = service.inspect_model_file
    monkeypatch.setattr(service, "inspect_model_file", lambda path, *a, **k: inspected.append(path) or real(path, *a, **k))
    content = teacher_files["onnx"].read_bytes()
    a, b = make_key("reupload-a"), make_key("reupload-b")
    first = upload(client, a, content, name="v1").json()
    again = upload(client, a, content, name="v2", format="onnx").json()
    assert len(inspected) == 1
    assert again["id"] != first["id"]
    assert {k: again[k] for k in ("format", "num_parameters", "sha256")} == \
        {k: first[k] for k in ("format", "num_parameters", "sha256")}
    assert client.get(f"/v1/models/{again['id']}", headers=a).json()["io_schema"] == first["io_schema"]
    upload(client, b, content, name="theirs")
    assert len(inspected) == 2
    refused = upload(client, a, content, name="claimed", format="torchscript")
    assert refused.status_code == 422 and len(inspected) == 3
