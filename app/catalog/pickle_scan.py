"""Static inspection of pickle streams: which globals would unpickling import? Nothing is executed.

``pickletools.genops`` only decodes opcodes; we never call ``pickle.load``. The scanner emulates the
unpickler's stack machine (the stack, MARK frames and the memo, as CPython's ``pickle._Unpickler``
keeps them), so ``STACK_GLOBAL`` is resolved from the values really on the stack, however they got
there (pushed, duplicated, fetched from the memo), and decoy strings pushed around it change nothing.
It fails closed: a ``STACK_GLOBAL`` whose operands are not two strings, an extension-registry code
(``EXT1/2/4``) or an opcode it does not model is reported as an unknown global, which no allow-list
accepts; a stream the unpickler itself would reject (stack underflow, a missing MARK, a memo entry
fetched before it was stored) raises ``ValueError``.

A TorchScript archive's ``data.pkl`` may reference TorchScript classes (``__torch__.…``) and tensor
rebuild helpers; any other global (``os.system``, ``builtins.eval``, a user's module) means the file
is not a plain TorchScript archive and is refused.
"""

from __future__ import annotations

import pickletools
from typing import Any

SAFE_MODULE_PREFIXES = ("__torch__", "torch._utils", "torch.jit._pickle", "collections", "torch")

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_EXT_OPS = {"EXT1", "EXT2", "EXT4"}
#: Opcodes whose only effect is popping ``pops`` values (after the MARK frame when ``mark``) and pushing
#: ``pushes`` values that are not strings. Taken from pickletools' stack effects, checked in the tests.
_PLAIN_OPS: dict[str, tuple[bool, int, int]] = {
    # name: (pops a MARK frame first, then pops this many, then pushes this many)
    **{n: (False, 0, 1) for n in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "BINBYTES",
                                   "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NEXT_BUFFER", "NONE", "NEWTRUE",
                                   "NEWFALSE", "FLOAT", "BINFLOAT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT",
                                   "EMPTY_SET", "PERSID")},
    **{n: (True, 0, 1) for n in ("LIST", "TUPLE", "DICT", "FROZENSET", "OBJ")},
    **{n: (True, 1, 1) for n in ("APPENDS", "SETITEMS", "ADDITEMS")},
    "POP_MARK": (True, 0, 0),
    "READONLY_BUFFER": (False, 1, 1), "BINPERSID": (False, 1, 1), "TUPLE1": (False, 1, 1),
    "APPEND": (False, 2, 1), "TUPLE2": (False, 2, 1), "REDUCE": (False, 2, 1), "BUILD": (False, 2, 1),
    "NEWOBJ": (False, 2, 1), "SETITEM": (False, 3, 1), "TUPLE3": (False, 3, 1), "NEWOBJ_EX": (False, 3, 1),
    "PROTO": (False, 0, 0), "FRAME": (False, 0, 0), "STOP": (False, 1, 0),
}


class _Value:
    """A value the scanner does not track (a number, a container, an object): never a module or name."""


_OPAQUE = _Value()


class _Machine:
    """The unpickler's stack, MARK frames and memo, holding strings and opaque placeholders."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.frames: list[list[Any]] = []  # stacks saved by MARK (CPython's metastack)
        self.memo: dict[int, Any] = {}

    def pop(self, n: int = 1) -> list[Any]:
        if len(self.stack) < n:
            raise ValueError("stack underflow")
        taken = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return taken

    def pop_mark(self) -> list[Any]:
        if not self.frames:
            raise ValueError("no MARK on the stack")
        items, self.stack = self.stack, self.frames.pop()
        return items

    def top(self) -> Any:
        if not self.stack:
            raise ValueError("memoizing from an empty stack")
        return self.stack[-1]


def _global_name(module: Any, name: Any) -> str:
    """``module.name``; a dotted *name* (``getattr`` chains: ``torch`` + ``os.system``) is spelled
    ``module:name`` so that no prefix allow-list mistakes it for a submodule."""
    return f"{module}:{name}" if "." in name else f"{module}.{name}"


def _step(m: _Machine, op: str, arg: Any) -> str | None:
    """Apply one opcode to the machine; return the global it imports, if any."""
    if op in _STRING_OPS:
        m.stack.append(arg if isinstance(arg, str) else _OPAQUE)
    elif op in _PUT_OPS:
        m.memo[int(arg)] = m.top()
    elif op == "MEMOIZE":
        m.memo[len(m.memo)] = m.top()
    elif op in _GET_OPS:
        if int(arg) not in m.memo:
            raise ValueError(f"memo entry {arg} is fetched but was never stored")
        m.stack.append(m.memo[int(arg)])
    elif op == "MARK":
        m.frames.append(m.stack)
        m.stack = []
    elif op == "POP":
        if m.stack:
            m.pop()
        else:  # CPython: POP on an empty frame discards the MARK
            m.pop_mark()
    elif op == "DUP":
        m.stack.append(m.top())
    elif op in ("GLOBAL", "INST"):
        module, _, name = str(arg).partition(" ")
        if op == "INST":
            m.pop_mark()
        m.stack.append(_OPAQUE)
        return _global_name(module, name)
    elif op == "STACK_GLOBAL":
        module, name = m.pop(2)
        m.stack.append(_OPAQUE)
        if not (isinstance(module, str) and isinstance(name, str)):
            return "<unknown: STACK_GLOBAL operands are not two strings>"
        return _global_name(module, name)
    elif op in _EXT_OPS:
        m.stack.append(_OPAQUE)
        return f"<unknown: extension registry code {arg} ({op})>"
    elif op in _PLAIN_OPS:
        mark, pops, pushes = _PLAIN_OPS[op]
        if mark:
            m.pop_mark()
        m.pop(pops)
        m.stack.extend([_OPAQUE] * pushes)
    else:
        return f"<unknown: opcode {op} is not modelled>"
    return None


def referenced_globals(data: bytes) -> list[str]:
    """Every ``module.name`` the pickle stream would import, in order. Raises ValueError on a corrupt stream.

    Input: the bytes of one pickle stream (up to its STOP). Output: the globals of ``GLOBAL``, ``INST``
    and ``STACK_GLOBAL``; entries starting ``<unknown:`` stand for imports that cannot be determined
    statically (fail closed: every allow-list refuses them).
    """
    machine = _Machine()
    found: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if (g := _step(machine, op.name, arg)) is not None:
                found.append(g)
    except Exception as exc:  # truncated, not a pickle at all, or inconsistent with the unpickler
        raise ValueError(f"corrupt pickle stream: {exc}") from exc
    return found


def unsafe_globals(data: bytes) -> list[str]:
    """The globals outside the TorchScript allow-list (empty when the stream is safe to hand to torch.jit.load)."""
    return [g for g in referenced_globals(data)
            if not any(g == p or g.startswith(p + ".") for p in SAFE_MODULE_PREFIXES)]


def _is_tensor_global(g: str) -> bool:
    """The globals ``torch.load(weights_only=True)`` itself permits: tensor rebuild helpers and storages."""
    return (g.startswith(("torch._utils._rebuild_", "torch._tensor._rebuild_")) or
            (g.startswith("torch.") and g.endswith("Storage")) or
            g in ("collections.OrderedDict", "torch.Size", "torch.device", "torch.float32", "torch.int64",
                  "torch.serialization._get_layout", "builtins.set"))


def non_tensor_globals(data: bytes) -> list[str]:
    """Globals beyond plain tensors and containers (empty when the stream only holds tensor data)."""
    return [g for g in referenced_globals(data) if not _is_tensor_global(g)]


def looks_like_module_pickle(data: bytes) -> bool:
    """True when a torch.save pickle stores a whole nn.Module (a class import outside torch's helpers)."""
    return any(not g.startswith(("torch._utils", "collections", "torch.")) or "nn.modules" in g
               for g in referenced_globals(data))
