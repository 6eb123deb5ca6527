"""inspect_model and its CLI: parameter counts, I/O signatures, precise failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from worker.engine import inspect_model

ROOT = Path(__file__).resolve().parents[2]
TEACHER_PARAMS = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def _cli(*args: str) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "worker.engine.inspect", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(lines[0]), proc.stderr


def test_torchscript(teacher_ts):
    info = inspect_model(teacher_ts.path, "torchscript")
    assert info == {"ok": True, "format": "torchscript", "num_parameters": TEACHER_PARAMS, "inputs": [], "outputs": []}


def test_onnx(teacher_onnx):
    info = inspect_model(teacher_onnx.path, "onnx")
    assert info["ok"] and info["format"] == "onnx" and info["num_parameters"] == TEACHER_PARAMS
    assert info["inputs"] == [{"name": "input", "shape": [None, 64], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": [None, 10], "dtype": "float32"}]


def test_frozen_torchscript_counts_inlined_weights(teacher_module, tmp_path):
    path = tmp_path / "frozen.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.script(teacher_module).eval())
        torch.jit.save(frozen, str(path))
    assert inspect_model(path, "torchscript")["num_parameters"] == TEACHER_PARAMS


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_junk_files_fail_with_a_reason(fmt, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a model" * 50)
    info = inspect_model(junk, fmt)
    assert info["ok"] is False and len(info["error"]) > 10
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert inspect_model(empty, fmt) == {"ok": False, "error": "the file is empty"}
    assert "file not found" in inspect_model(tmp_path / "nope", fmt)["error"]


def test_truncated_files_fail(teacher_ts, teacher_onnx, tmp_path):
    for source, fmt in ((teacher_ts, "torchscript"), (teacher_onnx, "onnx")):
        data = source.path.read_bytes()
        cut = tmp_path / f"cut.{fmt}"
        cut.write_bytes(data[: len(data) // 2])
        info = inspect_model(cut, fmt)
        assert info["ok"] is False, info


def test_wrong_format_and_unknown_format(teacher_ts, teacher_onnx):
    assert inspect_model(teacher_onnx.path, "torchscript")["ok"] is False
    assert inspect_model(teacher_ts.path, "onnx")["ok"] is False
    assert "unsupported model format 'tflite'" in inspect_model(teacher_ts.path, "tflite")["error"]


def test_cli_success_and_failure(teacher_onnx, teacher_ts, tmp_path):
    code, info, _ = _cli("--format", "onnx", str(teacher_onnx.path))
    assert code == 0 and info["ok"] and info["num_parameters"] == TEACHER_PARAMS
    data = teacher_ts.path.read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(data[: len(data) // 3])
    code, info, _ = _cli("--format", "torchscript", str(cut))
    assert code == 2 and info["ok"] is False and info["error"]
    code, info, _ = _cli(str(cut))  # missing --format: still one JSON line, exit 2
    assert code == 2 and info["ok"] is False and "usage" in info["error"]


def test_torch_save_checkpoint_gets_an_actionable_message(teacher_module, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(teacher_module.state_dict(), path)
    info = inspect_model(path, "torchscript")
    assert info["ok"] is False and "torch.save() checkpoint" in info["error"]


def test_inspect_torch_export_and_safetensors(teacher_module, tmp_path):
    import json as _json
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from worker.engine.inspect import inspect_model
    from worker.engine.students import from_architecture

    ep = torch.export.export(teacher_module, (torch.zeros(4, 64),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    pt2 = tmp_path / "m.pt2"
    torch.export.save(ep, str(pt2))
    info = inspect_model(pt2, "torch_export")
    assert info["ok"] and info["num_parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert info["inputs"][0]["shape"][1:] == [64] and info["outputs"][0]["shape"][1:] == [10]

    arch = {"family": "mlp", "in_features": 64, "hidden": [256, 256], "out_features": 10}
    keys = list(from_architecture(arch).state_dict())
    st = tmp_path / "m.safetensors"
    save_file(dict(zip(keys, [v.contiguous() for v in teacher_module.state_dict().values()])), str(st))
    proc = subprocess.run([sys.executable, "-m", "worker.engine.inspect", "--format", "safetensors",
                           "--architecture", _json.dumps(arch), str(st)], capture_output=True, text=True, timeout=120)
    out = _json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and out["ok"] and out["num_parameters"] == info["num_parameters"]
    bad = inspect_model(st, "safetensors", {**arch, "hidden": [128]})
    assert not bad["ok"] and "do not match" in bad["error"]
