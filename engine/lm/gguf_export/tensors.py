"""The GGUF tensors of a model: their llama.cpp names, shapes and encodings, and the plan that maps the checkpoint's
tensors onto them (GPT-2's Conv1D transposes, the llama q/k permutation, Llama 3's generated ``rope_freqs``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from engine.errors import ExportFailed
from engine.lm.gguf_export.architectures import _Hparams
from engine.lm.gguf_export.weights import _Weights

_F32, _F16, _Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_WEIGHT_QTYPES = {"f16": _F16, "q8_0": _Q8_0}
#: Buffers some checkpoints carry that are not weights (the converter skips the same names).
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _name(hp: _Hparams, key: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    name = gguf.TENSOR_NAMES[key]
    return (name.format(bid=bid) if bid is not None else name) + suffix


def _expected_tensors(hp: _Hparams) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → numpy (row-major) shape: what llama.cpp's loader asks for, for this config.

    llama.cpp writes shapes the other way round (``{n_embd, n_vocab}`` for a [n_vocab, n_embd] array)."""
    T = gguf.MODEL_TENSOR
    e, v, ff = hp.n_embd, hp.n_vocab, hp.n_ff
    out: dict[str, tuple[int, ...]] = {_name(hp, T.TOKEN_EMBD): (v, e)}
    if hp.rope_type == "llama3":
        out[_name(hp, T.ROPE_FREQS)] = (hp.head_dim // 2,)
    if hp.model_type == "gpt2":
        out[_name(hp, T.POS_EMBD)] = (hp.n_ctx, e)
    out[_name(hp, T.OUTPUT_NORM)] = (e,)
    if hp.model_type == "gpt2":
        out[_name(hp, T.OUTPUT_NORM, suffix=".bias")] = (e,)
    if not hp.tied:
        out[_name(hp, T.OUTPUT)] = (v, e)
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    for i in range(hp.n_layer):
        def add(key: gguf.MODEL_TENSOR, shape: tuple[int, ...], suffix: str = ".weight", i: int = i) -> None:
            out[_name(hp, key, i, suffix)] = shape

        add(T.ATTN_NORM, (e,))
        add(T.FFN_NORM, (e,))
        if hp.model_type == "gpt2":
            add(T.ATTN_NORM, (e,), ".bias")
            add(T.FFN_NORM, (e,), ".bias")
            add(T.ATTN_QKV, (3 * e, e))
            add(T.ATTN_QKV, (3 * e,), ".bias")
        else:
            add(T.ATTN_Q, (q, e))
            add(T.ATTN_K, (kv, e))
            add(T.ATTN_V, (kv, e))
            add(T.FFN_GATE, (ff, e))
            if hp.qkv_bias:
                add(T.ATTN_Q, (q,), ".bias")
                add(T.ATTN_K, (kv,), ".bias")
                add(T.ATTN_V, (kv,), ".bias")
            if hp.mlp_bias:
                add(T.FFN_GATE, (ff,), ".bias")
        add(T.ATTN_OUT, (e, q))
        add(T.FFN_UP, (ff, e))
        add(T.FFN_DOWN, (e, ff))
        if hp.out_bias:
            add(T.ATTN_OUT, (e,), ".bias")
        if hp.mlp_bias:
            add(T.FFN_UP, (ff,), ".bias")
            add(T.FFN_DOWN, (e,), ".bias")
    return out


def _tensor_qtype(hp: _Hparams, name: str, shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """The converter's choice (``ModelBase.prepare_tensors``): f32 for 1-D tensors, norms, biases and the position
    embedding (llama.cpp's kernels take those in f32 only), else the file's type; q8_0 needs rows of a multiple of 32."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or name == _name(hp, gguf.MODEL_TENSOR.POS_EMBD):
        return _F32
    qtype = _WEIGHT_QTYPES[dtype]
    if qtype == _Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[_Q8_0][0]:
        return _F16  # converter: gguf.QuantError → "falling back to F16"
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _llama_permute(w: Any, n_head: int) -> Any:
    """convert_hf_to_gguf's ``LlamaModel.permute``: per head, Hugging Face's [first half; second half] rotary rows become
    llama.cpp's interleaved pairs (row 2i, 2i+1 = rows i, i + d/2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Item:
    """One GGUF tensor to write: where it comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def _plan(hp: _Hparams, weights: _Weights, dtype: str) -> list[_Item]:
    """The GGUF tensors in the converter's order (generated tensors first, then the checkpoint's), checked against
    the config: every expected tensor once, with its shape, and no checkpoint tensor left unmapped."""
    expected = _expected_tensors(hp)
    tensor_map = gguf.get_tensor_name_map(hp.arch, hp.n_layer)
    items: list[_Item] = []
    if hp.rope_type == "llama3":
        name = _name(hp, gguf.MODEL_TENSOR.ROPE_FREQS)
        items.append(_Item(name, expected[name], _F32, lambda: _llama3_rope_factors(hp)))
    sources: dict[str, str] = {}
    output_name = _name(hp, gguf.MODEL_TENSOR.OUTPUT)
    for hf_name, shape in weights.shapes.items():
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportFailed(f"model weights: cannot map tensor {hf_name!r} to a llama.cpp {hp.arch_name} tensor (a "
                               f"variant of {hp.model_type} this exporter does not know)")
        if name == output_name and hp.tied:
            continue  # tied: llama.cpp reads token_embd.weight for the output projection
        if name in sources:
            raise ExportFailed(f"model weights: {sources[name]!r} and {hf_name!r} both map to {name}")
        if name not in expected:
            raise ExportFailed(f"model weights: tensor {hf_name!r} ({name}) does not belong to a {hp.model_type} model "
                               f"with this config.json")
        sources[name] = hf_name
        transpose = hp.model_type == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
        out_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        if out_shape != expected[name]:
            raise ExportFailed(f"model weights: {hf_name!r} has shape {list(shape)}, config.json implies "
                               f"{list(reversed(expected[name])) if transpose else list(expected[name])}")
        items.append(_Item(name, out_shape, _tensor_qtype(hp, name, out_shape, dtype),
                           _loader(hp, weights, hf_name, name, transpose)))
    missing = [n for n in expected if n not in sources and n != _name(hp, gguf.MODEL_TENSOR.ROPE_FREQS)]
    if missing:
        what = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        hint = " (lm_head.weight; config.json says tie_word_embeddings false)" if output_name in missing else ""
        raise ExportFailed(f"model weights: the checkpoint lacks {what}{hint}")
    return items


def _loader(hp: _Hparams, weights: _Weights, hf_name: str, name: str, transpose: bool) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import torch

        t = weights.load(hf_name)
        if t.dtype not in (torch.float16, torch.float32):
            t = t.to(torch.float32)  # converter: bf16 and others go through f32 (numpy has no bf16)
        if transpose:
            t = t.transpose(1, 0)  # GPT-2's Conv1D stores [in, out]; llama.cpp wants [out, in] rows like nn.Linear
        if hp.model_type == "llama":
            if name.startswith("blk.") and ".attn_q." in name:
                t = _llama_permute(t, hp.n_head)
            elif name.startswith("blk.") and ".attn_k." in name:
                t = _llama_permute(t, hp.n_head_kv)
        return np.ascontiguousarray(t.detach().cpu().numpy())

    return load


def _llama3_rope_factors(hp: _Hparams) -> np.ndarray:
    """converter: ``LlamaModel.generate_extra_tensors`` (the ``rope_freqs`` tensor of Llama 3.1's RoPE scaling)."""
    rope = hp.rope
    base = rope.get("rope_theta", hp.rope_theta or 10000.0)
    dim = hp.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
