"""Opening torch.export (``.pt2``) archives without unpickling or running anything.

:func:`check_pt2_archive` inspects the zip (entries, weight/constant configs, the serialized
graph's targets and shape expressions, sample inputs) and raises ``EngineError("invalid_model")``
for anything unsafe; :func:`safe_load_exported` then calls ``torch.export.load``. Not to be
confused with :mod:`.export`, which writes the student's exports.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError, InvalidModel, error_summary
from engine.inspection.zipcheck import refuse_unsafe_zip

# torch.export.load() unpickles in several places (weights/constants flagged use_pickle are read with
# torch.load(weights_only=False), custom/opaque objects with pickle, sample inputs fall back to
# weights_only=False), loads AOTInductor native code when present, evaluates shape expressions with
# sympy.sympify (eval) and resolves node targets by getattr on the torch module (torch.os.system...).
# safe_load_exported() checks the archive first and refuses all of that, so torch.export.load only
# ever takes its plain-tensor path.

_SAFE_EXPR_NAMES = {
    "Symbol", "Integer", "Rational", "True", "False", "positive", "integer", "nonnegative", "real", "finite",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "IntTrueDiv", "FloatTrueDiv", "Max", "Min", "oo", "TruncToInt",
}
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<str>'[A-Za-z_][A-Za-z0-9_]*')"
                         r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>\*\*|//|[-+*/%(),=<>!]=?))")
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}\d+$")
_SAFE_OPERATOR = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le",
                  "gt", "ge", "and_", "or_", "not_", "pos", "abs", "sym_not", "sym_float", "sym_int", "sym_max",
                  "sym_min", "sym_sqrt", "sym_ite"}


def _safe_expr(text: str) -> bool:
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return text[pos:].strip() == ""
        name = m.group("name")
        if name is not None and name not in _SAFE_EXPR_NAMES and not _SYMBOL_NAME.match(name):
            return False
        s = m.group("str")
        if s is not None and not _SYMBOL_NAME.match(s[1:-1]):
            return False
        pos = m.end()
    return True


def _safe_target(target: str) -> bool:
    import operator

    if target.startswith("torch.ops."):
        parts = target.split(".")[2:]
        if not 2 <= len(parts) <= 3 or any(p.startswith("__") or not p for p in parts):
            return False
        obj: Any = torch.ops
        try:
            for p in parts:
                obj = getattr(obj, p)
        except Exception:
            return False
        return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))
    if target.startswith("_operator."):
        name = target[len("_operator."):]
        return name in _SAFE_OPERATOR and hasattr(operator, name)
    if target.startswith("math."):
        import math as _m

        name = target[len("math."):]
        return name.isidentifier() and not name.startswith("_") and callable(getattr(_m, name, None))
    if target.startswith("torch.sym_") or target in ("torch.sym_float", "torch.sym_int"):
        return target.count(".") == 1 and callable(getattr(torch, target.split(".")[1], None))
    return False


def check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle, run native code, or eval anything; else return."""

    def bad(reason: str) -> EngineError:
        return InvalidModel(f"refusing torch.export archive: {reason}")

    if not zipfile.is_zipfile(path):
        raise InvalidModel("not a torch.export archive: the file is not a zip archive "
                          "(save it with torch.export.save(exported_program, 'model.pt2'))")
    # Duplicate names first of all: zipfile (this check) and torch's reader could otherwise read different copies.
    refuse_unsafe_zip(path, "invalid_model", "torch.export archive")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InvalidModel("not a torch.export archive: the file is not a zip archive "
                          "(save it with torch.export.save(exported_program, 'model.pt2'))") from None
    with zf:
        names = zf.namelist()
        if not names:
            raise bad("the archive is empty")
        root = names[0].split("/")[0]
        rel = {n[len(root) + 1:]: n for n in names if n.startswith(root + "/")}
        if "archive_format" not in rel:
            raise bad("it is not in the current torch.export.save format (re-save it with torch >= 2.7)")
        if any(r.startswith("data/aotinductor/") for r in rel):
            raise bad("it contains AOTInductor-compiled native code")
        models = [r for r in rel if r.startswith("models/") and r.endswith(".json")]
        if not models:
            raise bad("it holds no exported program")
        for r, full in rel.items():
            if r.startswith("data/weights/") and r.endswith(".pt") or r.startswith("data/constants/") and r.endswith(".pt"):
                raise bad(f"{r} is a pickled legacy payload")
            if r.endswith("_config.json") and (r.startswith("data/weights/") or r.startswith("data/constants/")):
                config = json.loads(zf.read(full)).get("config", {})
                for key, meta in config.items():
                    if meta.get("use_pickle"):
                        raise bad(f"{key!r} is stored pickled (tensor subclasses are not accepted)")
                    p = str(meta.get("path_name", ""))
                    if r.startswith("data/constants/") and not p.startswith("tensor_"):
                        raise bad(f"constant {key!r} is a custom/opaque object (needs pickle)")
        for r in models:
            program = json.loads(zf.read(rel[r]))
            for key, value in _walk_strings(program):
                if key == "expr_str" and not _safe_expr(value):
                    raise bad(f"shape expression {value[:80]!r} is not a plain symbolic expression")
                if key == "target" and not _safe_target(value):
                    raise bad(f"graph calls {value[:80]!r}, which is not a torch operator")
            name = r[len("models/"):-len(".json")]
            sample = rel.get(f"data/sample_inputs/{name}.pt")
            if sample is not None:
                import io

                data = zf.read(sample)
                if data:
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception:
                        raise bad("its sample inputs cannot be read without unpickling objects") from None


def _walk_strings(obj: Any, key: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_strings(v, key)
    elif isinstance(obj, str) and key in ("expr_str", "target"):
        yield key, obj


def safe_load_exported(path: Path) -> Any:
    """``torch.export.load`` after :func:`check_pt2_archive` (raises invalid_model)."""
    if not Path(path).is_file():
        raise InvalidModel(f"model file not found: {path}")
    check_pt2_archive(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except EngineError:
        raise
    except Exception as exc:
        raise InvalidModel(f"cannot load torch.export archive: {error_summary(exc)}") from None
