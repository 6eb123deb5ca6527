"""The static pickle scanner sees every global a stream would import, including names hidden in the memo."""

from __future__ import annotations

import collections
import pickle

import pytest

from app.catalog.pickle_scan import referenced_globals, unsafe_globals


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
