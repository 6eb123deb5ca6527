"""inspect_model and its CLI: parameter counts, I/O signatures, precise failures."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from engine import inspect_model

ROOT = Path(__file__).resolve().parents[2]
TEACHER_PARAMS = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def _cli(*args: str) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.inspection.model", *args],
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


@pytest.mark.slow  # runs the inspector command line (a python + torch process per call)
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


@pytest.mark.slow  # saves and loads a torch.export program (its first use in a process costs seconds)
def test_inspect_torch_export_and_safetensors(teacher_module, tmp_path):
    import json as _json
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from engine.inspection.model import inspect_model
    from engine.students.architecture import from_architecture

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
    proc = subprocess.run([sys.executable, "-m", "engine.inspection.model", "--format", "safetensors",
                           "--architecture", _json.dumps(arch), str(st)], capture_output=True, text=True, timeout=120)
    out = _json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and out["ok"] and out["num_parameters"] == info["num_parameters"]
    bad = inspect_model(st, "safetensors", {**arch, "hidden": [128]})
    assert not bad["ok"] and "do not match" in bad["error"]


# --- hostile files, refused by the engine too (defence in depth behind the API's checks) -------------------------

def _with_duplicate(path: Path, suffix: str, payload: bytes) -> bytes:
    """The archive at ``path`` with a second member of the same name as the first one ending in ``suffix``."""
    import io
    import zipfile

    buf = io.BytesIO(path.read_bytes())
    with zipfile.ZipFile(buf) as zf:
        name = next(n for n in zf.namelist() if n.endswith(suffix))
    with zipfile.ZipFile(buf, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zf.writestr(name, payload)
    return buf.getvalue()


def test_archives_with_duplicate_members_are_refused_before_torch_reads_them(teacher_ts, teacher_module, tmp_path):
    from engine.inspection.pt2 import check_pt2_archive
    from engine.teachers.torch_modules import load_module
    from engine.errors import EngineError

    ts = tmp_path / "dup.pt"
    ts.write_bytes(_with_duplicate(teacher_ts.path, "/data.pkl", b"\x80\x04."))
    info = inspect_model(ts, "torchscript")
    assert info["ok"] is False and info["error"].startswith("refusing TorchScript archive: member ")
    assert "appears more than once" in info["error"]
    with pytest.raises(EngineError, match="appears more than once") as err:
        load_module(ts, "torchscript")
    assert err.value.code == "invalid_model"

    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(teacher_module, (torch.zeros(2, 64),)), str(pt2))
    pt2.write_bytes(_with_duplicate(pt2, "data/sample_inputs/model.pt", b"\x80\x04."))
    with pytest.raises(EngineError, match=r"refusing torch.export archive: member '.*' appears more than once"):
        check_pt2_archive(pt2)
    assert "appears more than once" in inspect_model(pt2, "torch_export")["error"]


def _external_data_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    weight.external_data.add(key="location", value="/etc/passwd")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], initializer=[weight])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def test_onnx_with_external_data_is_refused_by_the_inspector_and_the_teacher(tmp_path):
    from engine.teachers.onnx_runtime import OnnxTeacher
    from engine.errors import EngineError

    path = _external_data_onnx(tmp_path / "ext.onnx")
    expected = ("ONNX initializer 'w' keeps its data in an external file ('/etc/passwd'); external data could name "
                "any file on the machine, so only self-contained models are accepted "
                "(save with onnx.save_model(model, path, save_as_external_data=False))")
    assert inspect_model(path, "onnx") == {"ok": False, "error": expected}
    with pytest.raises(EngineError) as err:
        OnnxTeacher(path, torch.device("cpu"))
    assert err.value.code == "invalid_model" and err.value.message == expected


def test_onnx_external_data_inside_a_subgraph_is_found():
    from onnx import TensorProto, helper

    from engine.inspection.model_facts import external_data_error

    inner = TensorProto(name="k", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=inner)], "then", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    plain = helper.make_graph([helper.make_node("Constant", [], ["c"], value=helper.make_tensor("k", 1, [1], [0.0]))],
                              "else", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=plain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    message = external_data_error(helper.make_model(graph))
    assert message is not None and message.startswith("ONNX attribute 'then_branch' of node 'If': attribute 'value'")


def test_engine_refuses_unsafe_input_names_and_lying_npy_headers(tmp_path):
    import io
    import zipfile

    import numpy as np

    from engine.data.loading import load_dataset
    from engine.data.npz import _cache_file
    from engine.inspection.dataset import inspect_dataset
    from engine.values import DatasetSource
    from engine.errors import EngineError

    good = tmp_path / "d.npz"
    np.savez(good, x=np.zeros((4, 2), np.float32))
    for name in ("../../etc", "a/b", "x\n"):
        with pytest.raises(EngineError, match="is not allowed: input names are 1 to 64 letters") as err:
            load_dataset(DatasetSource(good, "npz", inputs=(name,)), tmp_path / "cache")
        assert err.value.code == "invalid_dataset"
        assert "is not allowed" in inspect_dataset(good, "npz", inputs=[name])["error"]
    with pytest.raises(EngineError, match="cannot be unpacked"):
        _cache_file(tmp_path, "../outside")

    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f8", "fortran_order": False, "shape": (2**28, 1)})
    npy.write(bytes(16))
    lying = tmp_path / "lying.npz"
    with zipfile.ZipFile(lying, "w") as zf:
        zf.writestr("x.npy", npy.getvalue())
    expected = ("array 'x' declares shape [268435456, 1] of float64 (2147483648 bytes) but its member holds 16 bytes "
                "after the header; the file is damaged or crafted")
    assert inspect_dataset(lying, "npz") == {"ok": False, "error": expected}
    with pytest.raises(EngineError, match=re.escape(expected)):
        load_dataset(DatasetSource(lying, "npz"), tmp_path / "cache")


def test_engine_refuses_an_image_whose_header_declares_too_many_pixels(tmp_path):
    import struct
    import zipfile
    import zlib

    from engine.data.loading import load_dataset
    from engine.inspection.dataset import inspect_dataset
    from engine.values import DatasetSource
    from engine.errors import EngineError

    def png(width: int, height: int) -> bytes:
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/big.png", png(12_000, 12_000))  # under PIL's own bomb limit, over ours
        zf.writestr("b/small.png", png(4, 4))
    expected = "image 'a/big.png' declares 12000×12000 pixels, more than the limit of 100000000 pixels per image"
    assert inspect_dataset(path, "image_folder") == {"ok": False, "error": expected}
    with pytest.raises(EngineError, match=expected):
        load_dataset(DatasetSource(path, "image_folder"))
