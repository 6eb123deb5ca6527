"""Hostile uploads through the HTTP API: each is refused with a 422 naming the problem, before anything
inflates, unpickles or follows it (zip smuggling, bombs, path traversal, external data, pickle decoys)."""

from __future__ import annotations

import io
import pickle
import resource
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest

from tests.support.api import upload


def post_dataset(client, headers, content: bytes, fmt: str = "npz", **fields):
    return client.post("/v1/datasets", headers=headers, files={"file": (f"d.{fmt}", content)},
                       data={"name": "attack", "format": fmt, **fields})


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    return Tiny()


def test_pt2_with_a_duplicated_member_is_refused(client, make_key, tiny):
    import torch

    buf = io.BytesIO()
    torch.export.save(torch.export.export(tiny, (torch.zeros(2, 4),)), buf)
    with zipfile.ZipFile(buf) as zf:
        sample = next(n for n in zf.namelist() if n.endswith("data/sample_inputs/model.pt"))
    with zipfile.ZipFile(buf, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr(sample, pickle.dumps({"payload": print}))  # the copy a miniz reader could pick
    r = upload(client, make_key("attack-pt2"), buf.getvalue(), filename="m.pt2")
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "unsafe_archive"
    assert r.json()["detail"] == (
        f"the archive is refused: member {sample!r} appears more than once; readers disagree on which copy they "
        f"read, so archives with duplicate names are refused")


def _declare_size(data: bytes, member: str, size: int) -> bytes:
    """Patch the declared uncompressed size of ``member`` in its central-directory entry."""
    out = bytearray(data)
    at = out.index(b"PK\x01\x02")  # the first central-directory entry
    while out[at + 46:at + 46 + len(member)] != member.encode():
        at = out.index(b"PK\x01\x02", at + 4)
    out[at + 24:at + 28] = size.to_bytes(4, "little")
    return bytes(out)


def _answers_fast_without_inflating(call):
    """Run ``call``; assert it took under 5 s and the process's peak memory grew by less than 256 MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.monotonic()
    r = call()
    assert time.monotonic() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024
    return r


def test_npz_that_inflates_to_2_gib_is_refused_before_inflating(client, make_key):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", bytes(1 << 20))  # 1 MiB of zeros, about 1 KiB compressed
    bomb = _declare_size(buf.getvalue(), "x.npy", 2**31 - 1)  # says it inflates to 2 GiB
    r = _answers_fast_without_inflating(lambda: post_dataset(client, make_key("attack-npz"), bomb))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "unsafe_archive"
    detail = r.json()["detail"]
    assert detail.startswith("the .npz archive is refused: the zip archive inflates ") and "member 'x.npy'" in detail
    assert "(DISTILLERY_MAX_ARCHIVE_RATIO)" in detail


def test_npy_header_declaring_more_than_its_member_holds_is_refused(client, make_key):
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f8", "fortran_order": False, "shape": (2**28,)})
    npy.write(bytes(16))  # two float64s, not 2**28
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", npy.getvalue())
    r = _answers_fast_without_inflating(lambda: post_dataset(client, make_key("attack-npy"), buf.getvalue()))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_dataset_file"
    assert r.json()["detail"] == ("array 'x' declares shape [268435456] of float64 (2147483648 bytes) but its member "
                                  "holds 16 bytes after the header; the file is damaged or crafted")


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_image_zip_with_a_pixel_bomb_is_refused(client, make_key):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cats/a.png", _png(8, 8))
        zf.writestr("dogs/b.png", _png(20_000, 20_000))  # 400 M pixels declared in 60 bytes
    r = _answers_fast_without_inflating(lambda: post_dataset(client, make_key("attack-img"), buf.getvalue(),
                                                             "image_folder"))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_dataset_file"
    assert r.json()["detail"] == ("image 'dogs/b.png' declares 20000×20000 pixels, more than the limit of "
                                  "100000000 pixels per image")


def test_image_zip_with_a_symlink_is_refused(client, make_key):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cats/a.png", _png(8, 8))
        link = zipfile.ZipInfo("dogs/b.png")
        link.create_system, link.external_attr = 3, 0o120777 << 16
        zf.writestr(link, "/etc/shadow")
    r = post_dataset(client, make_key("attack-link"), buf.getvalue(), "image_folder")
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "unsafe_archive"
    assert r.json()["detail"] == ("the image_folder dataset is refused: member 'dogs/b.png' is a symbolic link; "
                                  "links are refused")


@pytest.mark.parametrize("inputs", ['["../../etc"]', '["x", "a/b"]', "x,../y", '["1x"]', '["x\\n"]'])
def test_input_names_that_are_not_identifiers_are_refused(client, make_key, inputs):
    data = _npz(x=np.zeros((4, 2), np.float32))
    r = post_dataset(client, make_key("attack-inputs"), data, inputs=inputs)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_error"
    assert "is not allowed: input names are 1 to 64 letters, digits or underscores" in r.json()["detail"]
    assert r.json()["errors"][0]["type"] == "invalid_input_name"


def test_onnx_with_an_external_data_initializer_is_refused(client, make_key):
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    r = upload(client, make_key("attack-onnx"), model.SerializeToString(), filename="m.onnx")
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_model_file"
    assert r.json()["detail"] == (
        "the onnx file cannot be loaded: ONNX initializer 'w' keeps its data in an external file "
        "('../../../../etc/passwd'); external data could name any file on the machine, so only self-contained "
        "models are accepted (save with onnx.save_model(model, path, save_as_external_data=False))")


def test_torchscript_with_a_stack_global_decoy_is_refused(client, make_key, tiny):
    import torch

    good = io.BytesIO()
    torch.jit.save(torch.jit.script(tiny), good)
    # Allowed-looking strings on top, os.system underneath: a scanner reading the last two strings
    # before STACK_GLOBAL sees torch._utils._rebuild_tensor_v2.
    def u(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    decoy = (b"\x80\x04" + u("os") + u("system") + b"(" + u("torch._utils") + u("_rebuild_tensor_v2") + b"1"
             + b"\x93" + u("true") + b"\x85R.")
    evil = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, decoy if name.endswith("/data.pkl") else src.read(name))
    r = upload(client, make_key("attack-pickle"), evil.getvalue(), filename="m.pt")
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_model_file"
    assert "references Python objects outside TorchScript (os.system)" in r.json()["detail"]


def test_schema_too_large_to_store_is_refused(client, make_key):
    arrays = {f"extra_{i:04d}": np.zeros(1, np.uint8) for i in range(2000)}  # about 43 bytes of schema each
    r = post_dataset(client, make_key("attack-schema"), _npz(x=np.zeros((4, 2), np.float32), **arrays))
    assert r.status_code == 422, r.text[:300]
    assert r.json()["code"] == "schema_too_large"
    detail = r.json()["detail"]
    size = int(detail.split("(")[1].split(" ")[0])
    assert size > 65536 and detail == f"the file's schema is too large to store ({size} bytes, at most 65536)"
