"""torch.export and safetensors(+architecture) uploads; pickles hidden inside a .pt2 are refused."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest

from tests.support.api import Payload, upload

pytestmark = pytest.mark.slow  # each test inspects a real model upload in the sandbox (python + torch, ~2 s)

PARAMS = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def _teacher_module(digits):
    from tests.support.teachers import train_mlp_teacher

    return train_mlp_teacher(digits, epochs=2)


def test_torch_export_upload(client, make_key, digits, tmp_path):
    import torch

    model = _teacher_module(digits)
    path = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 64),)), str(path))
    r = upload(client, make_key("fmt-a"), path.read_bytes(), filename="teacher.pt2")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "torch_export" and r.json()["num_parameters"] == PARAMS


def test_safetensors_needs_a_matching_architecture(client, make_key, digits, tmp_path):
    from safetensors.torch import save_file

    model = _teacher_module(digits)
    # The mlp family's layout: Flatten, then Linear/activation pairs, so Linear i sits at index 2i+1.
    weights = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in model.state_dict().items()}
    path = tmp_path / "t.safetensors"
    save_file(weights, str(path))
    h = make_key("fmt-b")
    arch = {"family": "mlp", "in_features": 64, "hidden": [256, 256], "out_features": 10}
    missing = upload(client, h, path.read_bytes())
    assert missing.status_code == 422 and "architecture" in missing.json()["detail"]
    ok = upload(client, h, path.read_bytes(), architecture=json.dumps(arch))
    assert ok.status_code == 201, ok.text
    assert ok.json()["format"] == "safetensors" and ok.json()["num_parameters"] == PARAMS
    assert ok.json()["architecture"] == arch
    wrong = upload(client, h, path.read_bytes(), architecture=json.dumps({**arch, "hidden": [128, 256]}))
    assert wrong.status_code == 422 and "cannot be loaded" in wrong.json()["detail"]
    unknown = upload(client, h, path.read_bytes(), architecture=json.dumps({"family": "bert"}))
    assert unknown.status_code == 422 and unknown.json()["code"] == "invalid_architecture"
    truncated = upload(client, h, path.read_bytes()[:-100], architecture=json.dumps(arch))
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]


def test_pickle_inside_torch_export_archive_is_refused(client, make_key, tmp_path, digits):
    import torch

    model = _teacher_module(digits)
    good = tmp_path / "t.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 64),)), str(good))
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("sample_inputs/model.pt"):
                data = pickle.dumps(Payload(marker))
            dst.writestr(name, data)
    r = upload(client, make_key("fmt-c"), evil.getvalue(), filename="t.pt2")
    assert r.status_code == 422 and "other than tensors" in r.json()["detail"], r.text
    assert not Path(marker).exists()
