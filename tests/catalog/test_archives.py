"""check_zip refuses archives that readers could understand differently, that escape a directory, or that
inflate far beyond their size, before any member is read; real torch/numpy archives pass.

One check (the ``safezip`` package) serves the API, under the deployment's settings, and the engine,
under its own ceilings.
"""

from __future__ import annotations

import io
import stat
import warnings
import zipfile

import numpy as np
import pytest

import safezip

LIMITS = {"max_total_bytes": 8 * 1024**3, "max_ratio": 100.0, "max_members": 1000}


@pytest.fixture()
def impl():
    return safezip


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _refused(impl, data: bytes, **limits) -> str:
    with pytest.raises(impl.UnsafeArchive) as err:
        impl.check_zip(io.BytesIO(data), **{**LIMITS, **limits})
    return str(err.value)


def test_duplicate_member_names_are_refused(impl):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name" but writes both entries
        zf.writestr("a/data.pkl", b"harmless")
        zf.writestr("a/data.pkl", b"payload")
    assert _refused(impl, buf.getvalue()) == (
        "member 'a/data.pkl' appears more than once; readers disagree on which copy they read, so archives "
        "with duplicate names are refused")


def test_symlink_members_are_refused(impl):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("cls/evil.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert _refused(impl, buf.getvalue()) == "member 'cls/evil.png' is a symbolic link; links are refused"


@pytest.mark.parametrize(("name", "reason"), [
    ("../x.npy", "has a '..' component"),
    ("a/../../x.npy", "has a '..' component"),
    ("/etc/x.npy", "is an absolute path"),
    ("C:/x.npy", "starts with a drive letter"),
    ("a\\..\\x.npy", "contains a backslash"),
])
def test_names_that_escape_a_directory_are_refused(impl, name, reason):
    assert _refused(impl, _named(name)) == f"member {name!r} {reason}; such names are refused"


def _named(name: str) -> bytes:
    """A one-member archive whose member is called ``name`` in both headers (zipfile's writer would
    sanitise a leading "/" or a drive letter, so a placeholder is patched)."""
    raw = name.encode()
    return _zip({"x" * len(raw): b"x"}).replace(b"x" * len(raw), raw)


def test_nul_byte_in_a_name_is_refused(impl):
    assert _refused(impl, _named("a\x00b.npy")) == "member 'a\\x00b.npy' contains a NUL byte; such names are refused"


def test_local_header_naming_another_file_is_refused(impl):
    data = _zip({"good.pkl": b"x"})
    at = data.index(b"good.pkl")  # the local header comes first; the central directory keeps "good.pkl"
    data = data[:at] + b"evil.pkl" + data[at + 8:]
    assert _refused(impl, data) == ("member 'good.pkl' is named 'evil.pkl' in its local header; readers would "
                                    "disagree on which file it is")


def test_overlapping_members_are_refused(impl):
    data = bytearray(_zip({"a.bin": b"a" * 100, "b.bin": np.random.default_rng(0).bytes(1000)}, zipfile.ZIP_DEFLATED))
    # Grow a's compressed size in the central directory so its data covers b's local header.
    cd = data.index(b"PK\x01\x02")
    data[cd + 20:cd + 24] = (200).to_bytes(4, "little")
    assert _refused(impl, bytes(data)) == ("members 'a.bin' and 'b.bin' overlap in the archive; overlapping members "
                                           "(a zip bomb technique) are refused")


def test_ratio_bomb_is_refused_before_inflating(impl):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("x.npy", "w") as f:
        chunk = bytes(8 * 1024**2)
        for _ in range(9):  # 72 MiB of zeros deflate to about 70 KiB
            f.write(chunk)
    message = _refused(impl, buf.getvalue())
    assert message.startswith("the zip archive inflates ") and "member 'x.npy'" in message
    setting = "the ratio limit"
    assert message.endswith(f"more than the limit of 100 ({setting}) for archives over {64 * 1024**2} bytes")
    # Below ratio_after_bytes a highly compressible archive is fine.
    impl.check_zip(io.BytesIO(buf.getvalue()), **LIMITS, ratio_after_bytes=128 * 1024**2)


def test_declared_size_over_the_budget_is_refused(impl):
    data = bytearray(_zip({"x.npy": bytes(1000)}, zipfile.ZIP_DEFLATED))
    cd = data.index(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (2**31).to_bytes(4, "little")  # declared uncompressed size: 2 GiB
    message = _refused(impl, bytes(data), max_total_bytes=2**30, limit_names={"bytes": "DISTILLERY_MAX_ARCHIVE_BYTES"})
    setting = "DISTILLERY_MAX_ARCHIVE_BYTES"
    assert message == (f"the zip archive inflates to {2**31} bytes (largest member 'x.npy': {2**31} bytes), more than "
                       f"the limit of {2**30} bytes ({setting})")


def test_too_many_members_are_refused(impl):
    data = _zip({f"m{i}.npy": b"" for i in range(5)})
    setting = "the member limit"
    assert _refused(impl, data, max_members=3) == f"the zip archive holds 5 members, more than the limit of 3 ({setting})"


def test_prefixed_and_appended_data_are_refused(impl):
    data = _zip({"a": b"a"})
    assert "prefixed or concatenated" in _refused(impl, b"\0" * 16 + data)
    assert _refused(impl, data + data).startswith("the zip archive's central directory is not where")
    assert "bytes after its end record" in _refused(impl, data + b"trailing")
    assert _refused(impl, b"not a zip") == "not a zip archive: no end of central directory record"


def test_stored_member_with_inconsistent_sizes_is_refused(impl):
    data = bytearray(_zip({"a.bin": b"a" * 10}))
    cd = data.index(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (10_000).to_bytes(4, "little")
    assert "is stored uncompressed but declares 10000 bytes in 10" in _refused(impl, bytes(data))


def test_real_torch_and_numpy_archives_pass(impl, tmp_path):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    model = Tiny()
    paths = {"jit": tmp_path / "m.pt", "pt2": tmp_path / "m.pt2", "sd": tmp_path / "sd.pt",
             "npz": tmp_path / "d.npz", "npzc": tmp_path / "c.npz"}
    torch.jit.save(torch.jit.script(model), str(paths["jit"]))
    torch.export.save(torch.export.export(model, (torch.zeros(2, 4),)), str(paths["pt2"]))
    torch.save(model.state_dict(), paths["sd"])
    np.savez(paths["npz"], x=np.zeros((3, 4), np.float32), y=np.arange(3))
    np.savez_compressed(paths["npzc"], x=np.zeros((3, 4), np.float32), y=np.arange(3))
    for kind, path in paths.items():
        infos = impl.check_zip(path, **LIMITS)
        assert [i.filename for i in infos] == zipfile.ZipFile(path).namelist(), kind
    with open(paths["npz"], "rb") as f:  # a file object works too, and keeps its position
        f.seek(5)
        impl.check_zip(f, **LIMITS)
        assert f.tell() == 5


def test_the_engine_refuses_with_an_engine_error(tmp_path):
    from engine.errors import EngineError
    from engine.inspection.zipcheck import refuse_unsafe_zip

    path = tmp_path / "m.pt"
    path.write_bytes(_zip({"../x": b"a"}))
    with pytest.raises(EngineError) as err:
        refuse_unsafe_zip(path, "invalid_model", "the teacher")
    assert err.value.code == "invalid_model"
    assert err.value.message == "refusing the teacher: member '../x' has a '..' component; such names are refused"
