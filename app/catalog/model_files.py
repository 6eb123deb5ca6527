"""Recognise an uploaded checkpoint's format from its bytes and refuse anything that needs unpickling.

The API process never imports torch: the structural checks here use the stdlib only, and the
deep check (does it load, how many parameters) runs in a short-lived subprocess
(``python -m worker.engine.inspect``) with a timeout, so a hostile or broken file can crash or hang
only that subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from app.catalog.pickle_scan import looks_like_module_pickle, unsafe_globals
from app.errors import Unprocessable

SUPPORTED_MODEL_FORMATS = ("torchscript", "onnx")
ALL_MODEL_FORMATS = ("torchscript", "onnx", "torch_export", "safetensors")

HOW_TO_EXPORT = (
    "Upload TorchScript (torch.jit.save(torch.jit.script(model), 'teacher.pt')) or ONNX "
    "(torch.onnx.export(model, example, 'teacher.onnx'))."
)


class ModelFileError(Unprocessable):
    code = "invalid_model_file"


@dataclass(frozen=True)
class Inspection:
    format: str
    num_parameters: int
    io_schema: dict


def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"the file is a damaged zip archive ({exc}); re-export it. {HOW_TO_EXPORT}") from exc


def _read_member(path: Path, name: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(name)
    except (zipfile.BadZipFile, OSError, KeyError, EOFError) as exc:
        raise ModelFileError(f"the archive is truncated or damaged: cannot read {name} ({exc}). {HOW_TO_EXPORT}") from exc


def detect_format(path: Path) -> str:
    """Return the format of the checkpoint at ``path`` or raise :class:`ModelFileError` saying why not."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelFileError("the file is empty")
    names = _zip_names(path)
    if names is not None:
        roots = {n.split("/", 1)[0] for n in names}
        rels = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if any(r.startswith("code/") for r in rels) and "constants.pkl" in rels:
            return "torchscript"
        if any(n.endswith("archive_format") for n in names) or any(r.startswith("models/") for r in rels):
            return "torch_export"
        pkl = next((n for n in names if n.endswith("data.pkl")), None)
        if pkl is not None:
            what = ("a whole nn.Module pickled with torch.save" if looks_like_module_pickle(_read_member(path, pkl))
                    else "a torch.save checkpoint (state_dict)")
            raise ModelFileError(
                f"this is {what}; loading it would mean unpickling, which Distillery never does. {HOW_TO_EXPORT}")
        raise ModelFileError(f"a zip archive that is not a TorchScript model (top-level entries: {sorted(roots)[:5]}). "
                             f"{HOW_TO_EXPORT}")
    if head[:1] == b"\x80" or head[:2] in (b"(d", b"(l", b"}q", b"]q", b"cc"):
        raise ModelFileError(f"this is a Python pickle (or a legacy torch.save file); loading it would run code "
                             f"from the file, so it is refused. {HOW_TO_EXPORT}")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head[:1] == b"\x08":  # ONNX ModelProto starts with field 1 (ir_version, varint)
        return "onnx"
    raise ModelFileError(f"not a recognised model file (first bytes {head[:8].hex()}). {HOW_TO_EXPORT}")


def check_torchscript_pickles(path: Path) -> None:
    """Refuse a TorchScript-looking archive whose pickles import anything but TorchScript/tensor helpers."""
    for name in _zip_names(path) or []:
        if name.endswith(".pkl") and not name.endswith(".debug_pkl"):
            try:
                bad = unsafe_globals(_read_member(path, name))
            except ValueError as exc:
                raise ModelFileError(f"{name} in the archive is damaged: {exc}. {HOW_TO_EXPORT}") from exc
            if bad:
                raise ModelFileError(f"{name} references Python objects outside TorchScript ({', '.join(bad[:3])}); "
                                     f"such a file could run code when loaded and is refused. {HOW_TO_EXPORT}")


def inspect_model_file(path: Path, claimed: str | None, timeout: float) -> Inspection:
    """Detect, check and measure an uploaded checkpoint. Raises :class:`ModelFileError` with the reason."""
    detected = detect_format(path)
    if claimed and claimed != detected:
        raise ModelFileError(f"format is '{claimed}' but the file is {detected}")
    if detected not in SUPPORTED_MODEL_FORMATS:
        raise ModelFileError(f"{detected} teachers are not supported by this deployment yet; "
                             f"supported: {', '.join(SUPPORTED_MODEL_FORMATS)}. {HOW_TO_EXPORT}")
    if detected == "torchscript":
        check_torchscript_pickles(path)
    try:
        proc = subprocess.run([sys.executable, "-m", "worker.engine.inspect", "--format", detected, str(path)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ModelFileError(f"inspecting the {detected} file took longer than {timeout:.0f} s") from exc
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = {"ok": False, "error": f"the model inspector crashed (exit {proc.returncode})"}
    if not result.get("ok"):
        raise ModelFileError(f"the {detected} file cannot be loaded: {result.get('error', 'unknown error')}")
    return Inspection(format=detected, num_parameters=int(result["num_parameters"]),
                      io_schema={"inputs": result.get("inputs", []), "outputs": result.get("outputs", [])})
