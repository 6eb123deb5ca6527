"""Recognise an uploaded checkpoint's format from its bytes and refuse anything that needs unpickling.

The API process never imports torch: the structural checks here use the stdlib only, and the
deep check (does it load, how many parameters) runs in a short-lived subprocess
(``python -m engine.inspection.model``) with a timeout, so a hostile or broken file can crash or hang
only that subprocess.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.catalog.inspector import run_inspector
from app.catalog.pickle_scan import looks_like_module_pickle, non_tensor_globals, unsafe_globals
from app.errors import Unprocessable
from jobspec import MODEL_FORMATS
from app.settings import get_settings
from safezip import UnsafeArchive, check_zip
from safezip.hf_model import (CONFIG_FILES, MAX_CONFIG_BYTES, NotAnHFModel, check_hf_config, check_hf_members,
                              hf_root)

SUPPORTED_MODEL_FORMATS = MODEL_FORMATS
ALL_MODEL_FORMATS = MODEL_FORMATS

HOW_TO_EXPORT = (
    "Upload TorchScript (torch.jit.save(torch.jit.script(model), 'teacher.pt')), ONNX "
    "(torch.onnx.export(model, example, 'teacher.onnx')), torch.export (torch.export.save(ep, 'teacher.pt2')) "
    "or safetensors weights with an 'architecture'; a generative language model as a zipped Hugging Face model "
    "directory (model.save_pretrained(dir, safe_serialization=True) + tokenizer.save_pretrained(dir))."
)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
#: Most bytes the stored inspection schema (``io_schema`` / a dataset's ``schema_``) may take as JSON.
MAX_SCHEMA_BYTES = 64 * 1024


class ModelFileError(Unprocessable):
    code = "invalid_model_file"


@dataclass(frozen=True)
class Inspection:
    format: str
    num_parameters: int
    io_schema: dict


ARCHIVE_SETTINGS = {"members": "DISTILLERY_MAX_ARCHIVE_MEMBERS", "bytes": "DISTILLERY_MAX_ARCHIVE_BYTES",
                    "ratio": "DISTILLERY_MAX_ARCHIVE_RATIO"}


def check_archive(source: Path | io.BytesIO, error: type[Unprocessable], what: str = "the archive") -> list[zipfile.ZipInfo]:
    """:func:`safezip.check_zip` under this deployment's DISTILLERY_MAX_ARCHIVE_* settings, before
    anything reads a member. Returns the members; raises ``error`` (code ``unsafe_archive``) saying why not."""
    settings = get_settings()
    try:
        return check_zip(source, max_total_bytes=settings.max_archive_bytes, max_ratio=settings.max_archive_ratio,
                         max_members=settings.max_archive_members, limit_names=ARCHIVE_SETTINGS)
    except UnsafeArchive as exc:
        raise error(f"{what} is refused: {exc}", code="unsafe_archive") from None


def refuse_oversized_schema(schema: dict, error: type[Unprocessable]) -> dict:
    """Return ``schema`` when its JSON fits in MAX_SCHEMA_BYTES; the inspector's output is untrusted and is
    stored with the row, so a file describing a million arrays or inputs is refused (``error``)."""
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > MAX_SCHEMA_BYTES:
        raise error(f"the file's schema is too large to store ({size} bytes, at most {MAX_SCHEMA_BYTES})",
                    code="schema_too_large")
    return schema


def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    return [i.filename for i in check_archive(path, ModelFileError)]


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
        if hf_root(names) is not None:
            return "hf_transformers"
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


def _refuse_unsafe(streams: Iterable[tuple[str, bytes]], scan: Callable[[bytes], list[str]], problem: str) -> None:
    """Scan each ``(where, pickle bytes)`` with ``scan``; refuse the file at the first damaged or unsafe stream."""
    for where, stream in streams:
        try:
            bad = scan(stream)
        except ValueError as exc:
            raise ModelFileError(f"{where} in the archive is damaged: {exc}. {HOW_TO_EXPORT}") from exc
        if bad:
            raise ModelFileError(f"{where} {problem} ({', '.join(bad[:3])}); such a file could run code when "
                                 f"loaded and is refused. {HOW_TO_EXPORT}")


def _archive_pickles(path: Path, nested: bool) -> list[tuple[str, bytes]]:
    """The pickle streams of a zip archive, reading it once: ``*.pkl`` members (not TorchScript's
    ``.debug_pkl``); with ``nested``, also raw pickle members and the pickles of zips stored inside."""
    streams: list[tuple[str, bytes]] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith(".pkl") and not name.endswith(".debug_pkl"):
                    streams.append((name, zf.read(name)))
                elif nested:
                    with zf.open(name) as member:  # look at the first bytes before reading a member whole
                        head = member.read(4)
                    if head[:1] == b"\x80":
                        streams.append((name, zf.read(name)))
                    elif head == b"PK\x03\x04":
                        inner_bytes = io.BytesIO(zf.read(name))
                        check_archive(inner_bytes, ModelFileError, f"the archive {name!r} stored inside")
                        with zipfile.ZipFile(inner_bytes) as inner:
                            streams += [(f"{name}:{n}", inner.read(n)) for n in inner.namelist() if n.endswith(".pkl")]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFileError(f"the archive is truncated or damaged ({exc}). {HOW_TO_EXPORT}") from exc
    return streams


def check_torchscript_pickles(path: Path) -> None:
    """Refuse a TorchScript-looking archive whose pickles import anything but TorchScript/tensor helpers."""
    _refuse_unsafe(_archive_pickles(path, nested=False), unsafe_globals, "references Python objects outside TorchScript")


def check_torch_export_pickles(path: Path) -> None:
    """A .pt2 archive may carry pickled weights/constants/sample inputs that ``torch.export.load`` unpickles
    with ``weights_only=False``. Allow only streams holding plain tensors; refuse anything else."""
    _refuse_unsafe(_archive_pickles(path, nested=True), non_tensor_globals, "pickles Python objects other than tensors")


def safetensors_parameters(path: Path) -> int:
    """Total elements of the tensors in a safetensors file, from its JSON header (nothing else is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelFileError("the safetensors header length is larger than the file; the file is truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"the safetensors header is not valid JSON: {exc}") from exc
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            shape = [int(d) for d in meta["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"safetensors entry {name!r} has no valid shape/data_offsets") from exc
        if not (0 <= start <= end <= size - 8 - n):
            raise ModelFileError(f"safetensors tensor {name!r} lies outside the file; the file is truncated")
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def check_hf_archive(path: Path) -> None:
    """A zipped Hugging Face model directory: data only (safezip.hf_model), its configs without remote code. A
    config is read only when its size (checked against the local header by check_zip) is within the limit."""
    infos = {i.filename: i for i in check_archive(path, ModelFileError)}
    names = list(infos)
    try:
        root = check_hf_members(names)
        for name in CONFIG_FILES:
            if root + name in infos:
                if infos[root + name].file_size > MAX_CONFIG_BYTES:
                    raise NotAnHFModel(f"{name} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
                check_hf_config(name, _read_member(path, root + name))
    except NotAnHFModel as exc:
        raise ModelFileError(str(exc)) from None


def inspect_model_file(path: Path, claimed: str | None, timeout: float, architecture: dict | None = None) -> Inspection:
    """Detect, check and measure an uploaded checkpoint. Raises :class:`ModelFileError` with the reason."""
    detected = detect_format(path)
    if claimed and claimed != detected:
        raise ModelFileError(f"format is '{claimed}' but the file is {detected}")
    if detected == "torchscript":
        check_torchscript_pickles(path)
    elif detected == "torch_export":
        check_torch_export_pickles(path)
    elif detected == "hf_transformers":
        check_hf_archive(path)
    elif detected == "safetensors":
        if architecture is None:
            raise ModelFileError("safetensors holds weights only: also send 'architecture', a built-in family and "
                                 'its arguments, e.g. {"family": "mlp", "in_features": 64, "hidden": [256, 256], '
                                 '"out_features": 10}')
        safetensors_parameters(path)
    args = ["--format", detected] + (["--architecture", json.dumps(architecture)] if architecture is not None else [])
    result = run_inspector("engine.inspection.model", args, path, timeout, error=ModelFileError,
                           what=f"the {detected} file")
    schema = {"inputs": result.get("inputs", []), "outputs": result.get("outputs", [])}
    if isinstance(result.get("hf"), dict):
        schema["hf"] = result["hf"]  # architecture, vocabulary, context length, dtype, tokenizer digest
    io_schema = refuse_oversized_schema(schema, ModelFileError)
    return Inspection(format=detected, num_parameters=int(result["num_parameters"]), io_schema=io_schema)
