"""The static pickle scanner sees every global a stream would import, including names hidden in the memo."""

from __future__ import annotations

import collections
import pickle

import pytest

from app.catalog.pickle_scan import non_tensor_globals, referenced_globals, unsafe_globals


class _Reduce:
    def __reduce__(self):
        return (print, ("never printed",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reduce_payloads_are_seen_in_every_protocol(protocol):
    found = referenced_globals(pickle.dumps(_Reduce(), protocol=protocol))
    # protocols 0-2 spell it the Python 2 way; either is outside the allow-list
    assert found in (["builtins.print"], ["__builtin__.print"])
    assert unsafe_globals(pickle.dumps(_Reduce(), protocol=protocol)) == found


def test_names_fetched_back_from_the_memo_are_not_hidden_by_decoys():
    # "posix"/"system" are memoized, decoy strings pushed and popped, then the real pair is fetched
    # from the memo for STACK_GLOBAL: a scanner that only looked at the last pushed strings would
    # report the harmless torch._utils._rebuild_tensor_v2.
    stream = (b"\x80\x04" + b"\x8c\x05posix\x94" + b"\x8c\x06system\x94" + b"00"
              + b"\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2" + b"00" + b"h\x00h\x01\x93"
              + b"\x8c\x04echo\x85R.")
    assert referenced_globals(stream) == ["posix.system"]
    assert unsafe_globals(stream) == ["posix.system"]


def test_plain_containers_are_safe_and_junk_is_an_error():
    assert unsafe_globals(pickle.dumps(collections.OrderedDict(a=1), protocol=2)) == []
    with pytest.raises(ValueError):
        referenced_globals(b"\x80\x04\x8c\x05posi")  # truncated


# --- the stack emulation: decoys, memo tricks, fail-closed cases ------------------------------------------------

def _p4(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts)


def _u(s: str) -> bytes:  # SHORT_BINUNICODE
    return b"\x8c" + bytes([len(s)]) + s.encode()


OS_SYSTEM = _u("os") + _u("system")
TORCH_DECOY = _u("torch._utils") + _u("_rebuild_tensor_v2")


@pytest.mark.parametrize("stream", [
    # the real operands below a MARK frame of allowed-looking strings, discarded by POP_MARK
    _p4(OS_SYSTEM, b"(", TORCH_DECOY, b"1", b"\x93", _u("id"), b"\x85R."),
    # the decoys packed into a tuple (TUPLE2), which is then popped
    _p4(OS_SYSTEM, TORCH_DECOY, b"\x86", b"0", b"\x93", _u("id"), b"\x85R."),
    # the real operands stored with BINPUT/LONG_BINPUT and fetched back, then the memoized decoys fetched
    # on top of them and packed away into a tuple
    _p4(_u("os"), b"q\x07", b"0", _u("system"), b"r\x09\x01\x00\x00", b"0", _u("torch._utils"), b"\x94",
        _u("_rebuild_tensor_v2"), b"\x94", b"00", b"h\x07", b"j\x09\x01\x00\x00", b"h\x02h\x03\x86", b"0",
        b"\x93", _u("id"), b"\x85R."),
    # DUP of a string and a decoy pair consumed by SETITEM into a dict
    _p4(_u("os"), _u("system"), b"}", TORCH_DECOY, b"s0", b"\x93", _u("id"), b"\x85R."),
], ids=["mark-frame", "tuple", "memo", "setitem"])
def test_decoy_strings_do_not_hide_the_real_stack_global(stream):
    # The unpickler really calls what sits on the stack: with builtins.len in place of os.system, len("id").
    assert pickle.loads(stream.replace(_u("os"), _u("builtins")).replace(_u("system"), _u("len"))) == 2
    assert referenced_globals(stream) == ["os.system"]
    assert unsafe_globals(stream) == ["os.system"]
    assert non_tensor_globals(stream) == ["os.system"]


def test_stack_global_of_anything_but_two_strings_is_refused():
    stream = _p4(_u("os"), b"K\x01", b"\x93", b".")  # a string and an int
    found = referenced_globals(stream)
    assert found == ["<unknown: STACK_GLOBAL operands are not two strings>"]
    assert unsafe_globals(stream) == found and non_tensor_globals(stream) == found


def test_extension_codes_and_dotted_names_are_refused():
    assert unsafe_globals(_p4(b"\x82\x01", b".")) == ["<unknown: extension registry code 1 (EXT1)>"]
    # pickle resolves "os.system" inside module "torch" by getattr: torch.os.system is os.system
    dotted = _p4(_u("torch"), _u("os.system"), b"\x93", b".")
    assert referenced_globals(dotted) == ["torch:os.system"]
    assert unsafe_globals(dotted) == ["torch:os.system"] and non_tensor_globals(dotted) == ["torch:os.system"]


@pytest.mark.parametrize("stream", [
    _p4(b"h\x05", b"\x93."),  # memo entry fetched but never stored
    _p4(_u("os"), b"\x93."),  # STACK_GLOBAL with one operand
    _p4(b"1."),  # POP_MARK without a MARK
    _p4(b"\x94."),  # MEMOIZE on an empty stack
])
def test_streams_the_unpickler_would_reject_are_errors(stream):
    with pytest.raises(ValueError, match="corrupt pickle stream"):
        referenced_globals(stream)


def test_every_opcode_is_modelled_with_pickletools_stack_effects():
    import pickletools

    from app.catalog import pickle_scan

    special = {"MARK", "POP", "DUP", "MEMOIZE", "GLOBAL", "INST", "STACK_GLOBAL"}
    modelled = (pickle_scan._STRING_OPS | pickle_scan._PUT_OPS | pickle_scan._GET_OPS | pickle_scan._EXT_OPS
                | set(pickle_scan._PLAIN_OPS) | special)
    assert [op.name for op in pickletools.opcodes if op.name not in modelled] == []
    for op in pickletools.opcodes:
        if op.name in pickle_scan._PLAIN_OPS:
            mark, pops, pushes = pickle_scan._PLAIN_OPS[op.name]
            before = [s.name for s in op.stack_before]
            assert mark == ("mark" in before), op.name
            assert pops == (before.index("mark") if mark else len(before)), op.name  # values below the MARK
            assert pushes == len(op.stack_after), op.name


def test_a_real_torch_save_state_dict_is_accepted():
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict(), buf)
    with zipfile.ZipFile(buf) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert "torch._utils._rebuild_tensor_v2" in referenced_globals(data)
    assert non_tensor_globals(data) == [] and unsafe_globals(data) == []


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_allowed_globals_pass_in_protocols_2_to_5(protocol):
    import torch

    value = collections.OrderedDict(shape=torch.Size([2, 3]), dtype=torch.float32, n=[1, 2.5, "s", (None, True)])
    stream = pickle.dumps(value, protocol=protocol)
    assert set(referenced_globals(stream)) == {"collections.OrderedDict", "torch.Size", "torch.float32"}
    assert non_tensor_globals(stream) == [] and unsafe_globals(stream) == []
