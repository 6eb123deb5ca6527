"""Static inspection of pickle streams: which globals would unpickling import? Nothing is executed.

``pickletools.genops`` only decodes opcodes; we never call ``pickle.load``. A TorchScript archive's
``data.pkl`` may reference TorchScript classes (``__torch__.…``) and tensor rebuild helpers; any
other global (``os.system``, ``builtins.eval``, a user's module) means the file is not a plain
TorchScript archive and is refused.
"""

from __future__ import annotations

import pickletools

SAFE_MODULE_PREFIXES = ("__torch__", "torch._utils", "torch.jit._pickle", "collections", "torch")


def referenced_globals(data: bytes) -> list[str]:
    """Every ``module.name`` the pickle stream would import, in order. Raises ValueError on a corrupt stream.

    ``STACK_GLOBAL`` takes module and name from the stack; they are tracked through string pushes and
    the memo (``MEMOIZE``/``PUT`` then ``GET``), so names fetched back from the memo are seen too. When
    the two values cannot be determined the global is reported as ``<unknown>`` (fail closed).
    """
    found: list[str] = []
    recent: list[object] = []  # values pushed by string and memo-get opcodes, in order
    memo: dict[int, object] = {}
    last: object = None  # the value the previous opcode pushed (what MEMOIZE/PUT store)
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            pushed: object = None
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(f"{module}.{attr}")
            elif name == "STACK_GLOBAL":
                pair = recent[-2:]
                found.append(".".join(pair) if len(pair) == 2 and all(isinstance(p, str) for p in pair)  # type: ignore[arg-type]
                             else "<unknown>")
            elif name == "MEMOIZE":
                memo[len(memo)] = last
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = last
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(int(arg))
                recent.append(pushed)
            elif isinstance(arg, str) and ("UNICODE" in name or name in ("BINSTRING", "SHORT_BINSTRING", "STRING")):
                pushed = arg
                recent.append(pushed)
            if name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME"):
                last = pushed
    except Exception as exc:  # truncated or not a pickle at all
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
