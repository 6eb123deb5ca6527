"""Writing the GGUF file: :func:`write_gguf` (tensor infos first, then the metadata, then one tensor at a time)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engine.errors import ExportFailed, Unsupported
from engine.lm.gguf_export.architectures import GGUF_DTYPES, _hparams, _set_parameters
from engine.lm.gguf_export.tensors import _F16, _FILE_TYPES, _Item, _nbytes, _plan
from engine.lm.gguf_export.tokenizer import _set_vocab
from engine.lm.gguf_export.weights import _read_json, _Weights


def _set_general(writer: gguf.GGUFWriter, model_dir: Path, name: str | None) -> None:
    """converter: ``ModelBase.prepare_metadata`` (general.type, the model card's general.* keys, the size label)."""
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    try:
        meta = gguf.Metadata.load(None, model_dir, name, total)
    except Exception:  # an unparsable README model card must not fail the export: fall back to the bare name
        meta = gguf.Metadata()
    meta.name = name or meta.name or model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)


# --------------------------------------------------------------------------------------------------------------------
# write


def write_gguf(model_dir: Path, out_path: Path, *, dtype: str = "f16", name: str | None = None) -> dict[str, Any]:
    """Convert the Hugging Face model directory ``model_dir`` to the GGUF file ``out_path``.

    ``dtype``: ``"f16"`` or ``"q8_0"`` (2-D weights; 1-D tensors, norms, biases and GPT-2's position embedding stay f32).
    ``name``: ``general.name`` (default: the model card's, else the directory's name). Returns ``{"architecture",
    "dtype", "tensors", "bytes", "parameters", "tied_embeddings", "tokenizer", "tokenizer_pre", "path"}``.
    Raises ``Unsupported`` for a model type, variant, tokenizer or dtype it cannot convert, ``ExportFailed`` for a
    broken model directory (missing or inconsistent config, weights or tokenizer)."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise Unsupported(f"GGUF export writes dtype {' or '.join(GGUF_DTYPES)}, not {dtype!r}")
    hp = _hparams(_read_json(model_dir / "config.json", "model config"))
    ftype = _FILE_TYPES[dtype]
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(path=None, arch=hp.arch_name)
    try:
        with _Weights(model_dir) as weights:
            items = _plan(hp, weights, dtype)
            for item in items:
                # Tensor infos first (no data): the header is written before any tensor is converted.
                writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), _nbytes(item.shape, item.qtype),
                                       raw_dtype=item.qtype)
            _set_general(writer, model_dir, name)
            _set_parameters(writer, hp, ftype)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab = _set_vocab(writer, model_dir, hp)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in items:
                writer.write_tensor_data(_encode(item))
            writer.close()
        os.replace(tmp, out_path)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, (ExportFailed, Unsupported)):
            # A failure of our own (disk full, a tensor gguf cannot encode) is still a failed export, with its cause.
            raise ExportFailed(f"writing {out_path.name} failed: {type(e).__name__}: {e}") from e
        raise
    return {"architecture": hp.arch_name, "dtype": dtype, "tensors": len(items), "bytes": out_path.stat().st_size,
            "parameters": sum(math.prod(i.shape) for i in items), "tied_embeddings": hp.tied, **vocab,
            "path": str(out_path)}


def _encode(item: _Item) -> np.ndarray:
    data = item.load()
    if data.shape != item.shape:
        raise ExportFailed(f"model weights: {item.name} loaded with shape {list(data.shape)}, expected {list(item.shape)}")
    out = gguf.quants.quantize(data, item.qtype)
    if item.qtype == _F16 and not np.isfinite(out).all() and np.isfinite(data).all():
        raise ExportFailed(f"model weights: {item.name} has values outside the float16 range; export as q8_0 instead")
    return out
