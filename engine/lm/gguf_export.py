"""Hugging Face causal LM → GGUF (llama.cpp's model file), f16 or q8_0, and a check that reads the file back.

Input: a Hugging Face model directory: ``config.json``; the weights as ``model.safetensors``, as safetensors shards with
``model.safetensors.index.json`` (never a pickle: the engine writes the directory itself); the tokenizer as
``tokenizer.json`` + ``tokenizer_config.json`` (a sentencepiece ``tokenizer.model`` is used when the ``sentencepiece``
package is installed). Output: one ``.gguf`` file (written to a temporary name, then renamed) and a dict of facts.

:func:`write_gguf` follows llama.cpp's ``convert_hf_to_gguf.py`` (``conversion/base.py``, ``llama.py``, ``qwen.py``,
``gpt2.py`` of the llama.cpp that ships gguf-py 0.19): the tensor names of gguf-py's ``TensorNameMap``, the q/k row
permutation of ``LlamaModel.permute`` (llama.cpp's rope rotates adjacent pairs, Hugging Face's rotates the two halves of a
head), GPT-2's Conv1D weights transposed, 1-D tensors, ``*_norm.weight``, biases and ``position_embd`` kept in f32, a
q8_0 tensor whose rows are not a multiple of 32 written as f16 (the converter's ``QuantError`` fallback), the
``general.*`` keys of gguf-py's ``Metadata``, the ``<arch>.*`` hyperparameters of ``TextModel.set_gguf_parameters``, and
the tokenizer as ``tokenizer.ggml.*`` (byte-level BPE → model ``gpt2`` with tokens, token types, merges and the
pre-tokenizer name; llama sentencepiece-style → model ``llama`` with scores). Tied embeddings write no
``output.weight`` (llama.cpp then reuses ``token_embd.weight``). Tensors are converted one at a time: the tensor infos
are written first, so memory holds one tensor, not the model.

:func:`verify_gguf` reads the file with ``gguf.GGUFReader`` and checks it against the model directory's ``config.json``
and tokenizer files on its own terms (the tensors llama.cpp's loader asks for, with their shapes; the hyperparameters;
the vocabulary), so it also catches a file that is truncated, corrupted or belongs to another model.

Where this deliberately differs from the converter (each marked "converter:" below): GPT-2's ``feed_forward_length`` is
``n_inner`` when set (the converter always writes ``4 * n_embd``, which llama.cpp's loader then rejects for such
models); a byte-level BPE tokenizer whose pre-tokenizer hash llama.cpp does not list is named from its
``tokenizer.json`` structure when that is exactly GPT-2's, Llama 3's or Qwen2's (the converter refuses it); that
vocabulary is read from tokenizer.json with ``tokenizers`` (the converter's ``AutoTokenizer`` may load the directory
through its model type's tokenizer class, which can add tokens); the token list of a Hugging Face llama tokenizer is
padded to ``vocab_size``; an unknown RoPE type, an activation or attention variant
llama.cpp does not run, or a quantized checkpoint is refused (``Unsupported``) instead of converted wrongly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engine.errors import ExportFailed, Unsupported

#: Hugging Face ``model_type`` values this module converts (llama.cpp architectures of the same name).
GGUF_ARCHITECTURES = ("llama", "qwen2", "gpt2")
#: Output encodings: ``f16`` (llama.cpp ``MOSTLY_F16``) and ``q8_0`` (``MOSTLY_Q8_0``).
GGUF_DTYPES = ("f16", "q8_0")

_F32, _F16, _Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_WEIGHT_QTYPES = {"f16": _F16, "q8_0": _Q8_0}
_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gpt2": gguf.MODEL_ARCH.GPT2}
#: The Hugging Face classes whose checkpoints we know the tensor names of (config ``architectures``).
_HF_CLASSES = {"llama": ("LlamaForCausalLM",), "qwen2": ("Qwen2ForCausalLM",), "gpt2": ("GPT2LMHeadModel",)}
#: Hugging Face's default for ``tie_word_embeddings`` when config.json does not say.
_TIED_DEFAULT = {"llama": False, "qwen2": False, "gpt2": True}
#: Buffers some checkpoints carry that are not weights (the converter skips the same names).
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
#: GPT-2's tanh-approximated GELU is what llama.cpp's ``ggml_gelu`` computes.
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

#: llama.cpp's pre-tokenizer names for the byte-level BPE tokenizers of models of these architectures, keyed by the
#: sha256 of the token ids of ``_CHK_TXT`` (a subset of ``get_vocab_base_pre`` in convert_hf_to_gguf.py).
_PRE_BY_HASH = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B (Qwen2, 2.5)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b-base
}
_CHK_TXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
#: The split regexes of Llama 3's and Qwen2's tokenizer.json (llama.cpp's ``llama-vocab.cpp`` quotes them as the originals).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


# --------------------------------------------------------------------------------------------------------------------
# hyperparameters


@dataclass(frozen=True)
class _Hparams:
    """config.json reduced to what the GGUF file carries and the loader checks."""

    model_type: str
    arch: gguf.MODEL_ARCH
    n_layer: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_in_config: bool  # the converter writes key/value_length only when config.json has head_dim
    n_vocab: int
    tied: bool
    norm_eps: float  # rms_norm_eps (llama, qwen2) or layer_norm_epsilon (gpt2)
    rope_theta: float | None = None
    rope_type: str | None = None  # None, "linear", "yarn" or "llama3"
    rope: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportFailed(f"{what}: {path.name} is missing from the model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFailed(f"{what}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportFailed(f"{what}: {path.name} is not a JSON object")
    return data


def _int(config: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ExportFailed(f"config.json: {key} must be a positive integer, got {value!r}")
            return value
    if default is not None:
        return default
    raise ExportFailed(f"config.json: {' / '.join(keys)} is missing")


def _float(config: dict[str, Any], key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExportFailed(f"config.json: {key} must be a number, got {value!r}")
    return float(value)


def _hparams(config: dict[str, Any]) -> _Hparams:
    model_type = config.get("model_type")
    if model_type not in _ARCHS:
        raise Unsupported(f"GGUF export supports the Hugging Face model types {', '.join(GGUF_ARCHITECTURES)}; this model is "
                          f"model_type {model_type!r}")
    classes = config.get("architectures") or []
    if classes and classes[0] not in _HF_CLASSES[model_type]:
        raise Unsupported(f"GGUF export needs a causal LM checkpoint ({' / '.join(_HF_CLASSES[model_type])}); config.json "
                          f"names {classes[0]!r}")
    if config.get("quantization_config"):
        raise Unsupported("GGUF export needs an unquantized checkpoint; config.json has a quantization_config")
    tied = config.get("tie_word_embeddings", _TIED_DEFAULT[model_type])
    if model_type == "gpt2":
        return _gpt2_hparams(config, bool(tied))
    return _llama_hparams(config, model_type, bool(tied))


def _gpt2_hparams(config: dict[str, Any], tied: bool) -> _Hparams:
    act = config.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise Unsupported(f"GGUF export of gpt2: llama.cpp runs the tanh GELU ({', '.join(_GPT2_ACTIVATIONS)}), this model "
                          f"uses activation_function {act!r}")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False \
            or config.get("add_cross_attention"):
        raise Unsupported("GGUF export of gpt2: llama.cpp runs GPT-2's standard attention only (not "
                          "scale_attn_by_inverse_layer_idx, unscaled attention or cross-attention)")
    n_embd, n_head = _int(config, "n_embd"), _int(config, "n_head")
    if n_embd % n_head:
        raise ExportFailed(f"config.json: n_embd {n_embd} is not a multiple of n_head {n_head}")
    return _Hparams(
        model_type="gpt2", arch=gguf.MODEL_ARCH.GPT2, n_layer=_int(config, "n_layer"),
        # converter: self.hparams["n_ctx"]; transformers 5 writes only n_positions.
        n_ctx=_int(config, "n_ctx", "n_positions"), n_embd=n_embd,
        # converter: always 4 * n_embd, which breaks llama.cpp's shape check for ffn_up/ffn_down when n_inner is set.
        n_ff=_int(config, "n_inner", default=4 * n_embd), n_head=n_head, n_head_kv=n_head, head_dim=n_embd // n_head,
        head_dim_in_config=False, n_vocab=_int(config, "vocab_size"), tied=tied,
        norm_eps=_float(config, "layer_norm_epsilon", 1e-5), qkv_bias=True, out_bias=True, mlp_bias=True)


def _llama_hparams(config: dict[str, Any], model_type: str, tied: bool) -> _Hparams:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise Unsupported(f"GGUF export of {model_type}: llama.cpp runs a SiLU-gated MLP, this model uses hidden_act {act!r}")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise Unsupported("GGUF export of qwen2: llama.cpp's qwen2 has no sliding-window attention (use_sliding_window)")
    n_embd, n_head = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    n_head_kv = _int(config, "num_key_value_heads", default=n_head)
    head_dim = config.get("head_dim")
    if head_dim is None and n_embd % n_head:
        raise ExportFailed(f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    head_dim = _int(config, "head_dim") if head_dim is not None else n_embd // n_head
    if n_head % n_head_kv or head_dim % 2:
        raise ExportFailed(f"config.json: num_attention_heads {n_head} / num_key_value_heads {n_head_kv} / head_dim "
                           f"{head_dim} do not fit (heads a multiple of kv heads, an even head_dim)")
    # converter: rope_parameters (transformers 5) or rope_scaling (older), rope_theta mirrored from the top level.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        raise Unsupported(f"GGUF export of {model_type}: per-layer-type rope_parameters are not supported")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type"))
    rope_type = None if rope_type in (None, "default") else str(rope_type).lower()
    allowed = ("linear", "yarn", "llama3") if model_type == "llama" else ("linear", "yarn")
    if rope_type is not None and rope_type not in allowed:
        raise Unsupported(f"GGUF export of {model_type}: RoPE type {rope_type!r} is not supported (supported: default, "
                          f"{', '.join(allowed)})")
    if rope_type in ("linear", "yarn") and not isinstance(rope.get("factor"), (int, float)):
        raise ExportFailed(f"config.json: RoPE type {rope_type!r} without a numeric factor")
    if rope_type == "yarn" and not isinstance(rope.get("original_max_position_embeddings"), int):
        raise ExportFailed("config.json: yarn RoPE without original_max_position_embeddings")
    attention_bias = bool(config.get("attention_bias", False))
    return _Hparams(
        model_type=model_type, arch=_ARCHS[model_type], n_layer=_int(config, "num_hidden_layers"),
        n_ctx=_int(config, "max_position_embeddings"), n_embd=n_embd, n_ff=_int(config, "intermediate_size"),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_in_config="head_dim" in config,
        n_vocab=_int(config, "vocab_size"), tied=tied, norm_eps=_float(config, "rms_norm_eps", 1e-6),
        rope_theta=None if theta is None else _float({"rope_theta": theta}, "rope_theta"), rope_type=rope_type, rope=rope,
        # Qwen2's q/k/v projections always have biases (its o_proj none); Llama's follow attention_bias / mlp_bias.
        qkv_bias=model_type == "qwen2" or attention_bias, out_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)))


# --------------------------------------------------------------------------------------------------------------------
# tensors


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


class _Weights(contextlib.AbstractContextManager):
    """The checkpoint's tensors by name, opened lazily (safetensors memory-maps; one tensor is read at a time)."""

    def __init__(self, model_dir: Path):
        self._stack = contextlib.ExitStack()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._get: dict[str, Callable[[], Any]] = {}
        self.source = ""
        try:
            self._open(model_dir)
        except (ExportFailed, Unsupported):
            self._stack.close()
            raise
        except Exception as e:  # a corrupt safetensors header, a bad pickle: the input is broken
            self._stack.close()
            raise ExportFailed(f"cannot read the model weights ({self.source or 'model directory'}): "
                               f"{type(e).__name__}: {e}") from None

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, "model weights").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ExportFailed("model.safetensors.index.json has no weight_map")
            parts = sorted(set(map(str, weight_map.values())))
            missing = [p for p in parts if not (model_dir / p).is_file() or Path(p).name != p]
            if missing:
                raise ExportFailed(f"model weights: shard(s) {', '.join(missing)} named in model.safetensors.index.json "
                                   f"are missing")
        elif (model_dir / "model.safetensors").is_file():
            weight_map, parts = None, ["model.safetensors"]
        else:
            raise ExportFailed("model weights: no model.safetensors (or shards with model.safetensors.index.json) in the "
                               "model directory")
        for part in parts:
            self.source = part
            f = self._stack.enter_context(safe_open(str(model_dir / part), framework="pt"))
            for name in f.keys():
                if name in self.shapes:
                    raise ExportFailed(f"model weights: tensor {name!r} appears in more than one shard")
                self.shapes[name] = tuple(f.get_slice(name).get_shape())
                self._get[name] = lambda f=f, name=name: f.get_tensor(name)
        if weight_map is not None and set(weight_map) != set(self.shapes):
            lost = sorted(set(weight_map) - set(self.shapes))[:5]
            extra = sorted(set(self.shapes) - set(weight_map))[:5]
            raise ExportFailed(f"model weights: the shards do not match model.safetensors.index.json (missing {lost}, "
                               f"not indexed {extra})")

    def load(self, name: str) -> Any:
        return self._get[name]()


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


# --------------------------------------------------------------------------------------------------------------------
# metadata


def _set_parameters(writer: gguf.GGUFWriter, hp: _Hparams, ftype: gguf.LlamaFileType) -> None:
    """converter: ``TextModel.set_gguf_parameters`` (+ ``LlamaModel``'s vocab size and rope dimensions, ``GPT2Model``'s
    own short list)."""
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    if hp.model_type == "gpt2":
        writer.add_layer_norm_eps(hp.norm_eps)
        writer.add_file_type(ftype)
        return
    writer.add_head_count_kv(hp.n_head_kv)
    rope = hp.rope
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif hp.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if (ext := rope.get("extrapolation_factor")) is not None:
            writer.add_rope_scaling_yarn_ext_factor(ext)
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            writer.add_rope_scaling_yarn_attn_factor(attn)
        if (fast := rope.get("beta_fast")) is not None:
            writer.add_rope_scaling_yarn_beta_fast(fast)
        if (slow := rope.get("beta_slow")) is not None:
            writer.add_rope_scaling_yarn_beta_slow(slow)
    if hp.rope_theta is not None:
        writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.norm_eps)
    if hp.head_dim_in_config:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_file_type(ftype)
    if hp.model_type == "llama":
        writer.add_vocab_size(hp.n_vocab)
        writer.add_rope_dimension_count(hp.head_dim)


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
# tokenizer


def _bpe_pre_from_structure(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer whose splitting this tokenizer.json does exactly, or None.

    converter: only the hash of a known model's tokenization names it; a freshly trained tokenizer with GPT-2's (or
    Llama 3's, Qwen2's) pre-tokenizer has an unknown hash but the same splitting, which is what ``tokenizer.ggml.pre``
    selects in llama.cpp."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return None
    norm, pre = tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer") or {}
    if norm is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space") \
            and not model.get("ignore_merges"):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    pattern = (split.get("pattern") or {}).get("Regex")
    if pattern == _LLAMA3_SPLIT and norm is None and model.get("ignore_merges"):
        return "llama-bpe"
    if pattern == _QWEN2_SPLIT and (norm is None or norm.get("type") == "NFC") and not model.get("ignore_merges"):
        return "qwen2"
    return None


def _gpt2_vocab(model_dir: Path, hp: _Hparams) -> tuple[list[str], list[int], str]:
    """converter: ``TextModel.get_vocab_base`` + ``get_vocab_base_pre`` (tokens padded to vocab_size with [PADi]).

    The tokenizer is tokenizer.json itself (``tokenizers.Tokenizer``), not ``AutoTokenizer``: transformers may load a
    directory through the class of its model type (Qwen2Tokenizer adds ``<|endoftext|>`` to a tokenizer that has none),
    and the GGUF must carry the vocabulary the model was trained with."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:
        raise ExportFailed(f"tokenizer: tokenizer.json is not a readable tokenizer ({type(e).__name__}: {e})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if not vocab:
        raise ExportFailed("tokenizer: tokenizer.json has an empty vocabulary")
    if max(vocab.values()) >= hp.n_vocab:
        raise ExportFailed(f"tokenizer: token id {max(vocab.values())} does not fit config.json vocab_size {hp.n_vocab}")
    chkhsh = sha256(str(tokenizer.encode(_CHK_TXT).ids).encode()).hexdigest()
    tokpre = _PRE_BY_HASH.get(chkhsh)
    if tokpre is None:
        tokpre = _bpe_pre_from_structure(_read_json(model_dir / "tokenizer.json", "tokenizer"))
    if tokpre is None:
        raise Unsupported(f"GGUF export: llama.cpp does not know this BPE tokenizer's pre-tokenizer (hash {chkhsh}), and "
                          f"tokenizer.json is not exactly GPT-2's, Llama 3's or Qwen2's byte-level scheme")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(hp.n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            # llama.cpp expects CONTROL / USER_DEFINED tokens pre-normalized (converter: encode + decode them).
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # converter (for Gemma): pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, tokpre


def _looks_special(token: str) -> bool:
    """converter: ``TextModel.does_token_look_special``."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def _sentencepiece_vocab(model_dir: Path, hp: _Hparams) -> tuple[list[bytes], list[float], list[int]]:
    """converter: ``TextModel._create_vocab_sentencepiece`` (tokenizer.model + added tokens, padded to vocab_size)."""
    processor_cls = gguf.vocab.SentencePieceProcessor  # None without the sentencepiece package
    sp = processor_cls()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = hp.n_vocab
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(gguf.TokenType.UNUSED)] * n
    for i in range(min(sp.vocab_size(), n)):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), int(kind)
    added = model_dir / "added_tokens.json"
    if added.is_file():
        for text, i in _read_json(added, "tokenizer").items():
            if isinstance(i, int) and 0 <= i < n:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, int(gguf.TokenType.USER_DEFINED)
    config = model_dir / "tokenizer_config.json"
    decoder = _read_json(config, "tokenizer").get("added_tokens_decoder", {}) if config.is_file() else {}
    for key, data in decoder.items():
        i, text = int(key), data["content"]
        if not 0 <= i < n:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(gguf.TokenType.USER_DEFINED)
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    return tokens, scores, types


def _set_vocab(writer: gguf.GGUFWriter, model_dir: Path, hp: _Hparams) -> dict[str, Any]:
    """The tokenizer as ``tokenizer.ggml.*``, the way the converter's ``set_vocab`` of each architecture picks it:
    llama tries sentencepiece, then a Hugging Face llama tokenizer, then byte-level BPE; qwen2 sentencepiece then BPE;
    gpt2 BPE only."""
    has_json = (model_dir / "tokenizer.json").is_file()
    if hp.model_type != "gpt2" and (model_dir / "tokenizer.model").is_file():
        if gguf.vocab.SentencePieceProcessor is not None:
            tokens, scores, types = _sentencepiece_vocab(model_dir, hp)
            return _write_llama_vocab(writer, model_dir, hp, tokens, scores, types)
        if not has_json:
            raise Unsupported("GGUF export: the tokenizer is a sentencepiece tokenizer.model only; install the "
                              "sentencepiece package or save the tokenizer with its tokenizer.json")
    if not has_json:
        raise ExportFailed("tokenizer: tokenizer.json is missing from the model directory")
    if hp.model_type == "llama":
        try:
            hf_vocab = gguf.LlamaHfVocab(model_dir)
        except (FileNotFoundError, TypeError):
            hf_vocab = None  # not a sentencepiece-style (byte-fallback) tokenizer: byte-level BPE below
        except Exception as e:
            raise ExportFailed(f"tokenizer: cannot read tokenizer.json ({type(e).__name__}: {e})") from None
        if hf_vocab is not None:
            tokens, scores, types = [], [], []
            for text, score, kind in hf_vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(int(kind))
            if len(tokens) > hp.n_vocab:
                raise ExportFailed(f"tokenizer: {len(tokens)} tokens do not fit config.json vocab_size {hp.n_vocab}")
            # converter: the list stays at the tokenizer's size; llama.cpp needs one token per embedding row.
            for i in range(len(tokens), hp.n_vocab):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(int(gguf.TokenType.UNUSED))
            return _write_llama_vocab(writer, model_dir, hp, tokens, scores, types)
    tokens, types, tokpre = _gpt2_vocab(model_dir, hp)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokpre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    if not special.merges:
        raise ExportFailed("tokenizer: the BPE tokenizer has no merges (tokenizer.json model.merges or merges.txt)")
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": "gpt2", "tokenizer_pre": tokpre}


def _write_llama_vocab(writer: gguf.GGUFWriter, model_dir: Path, hp: _Hparams, tokens: list[bytes], scores: list[float],
                       types: list[int]) -> dict[str, Any]:
    config = model_dir / "tokenizer_config.json"
    if hp.model_type == "llama" and config.is_file():
        # converter: LlamaModel.set_vocab copies add_prefix_space (sentencepiece's dummy prefix) when it is given.
        add_prefix_space = _read_json(config, "tokenizer").get("add_prefix_space")
        if isinstance(add_prefix_space, bool):
            writer.add_add_space_prefix(add_prefix_space)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return {"tokenizer": "llama", "tokenizer_pre": "default"}


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


# --------------------------------------------------------------------------------------------------------------------
# verify


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, float) or isinstance(a, float):
        return a is not None and b is not None and bool(np.float32(a) == np.float32(b))
    return a == b


def _declared_special(model_dir: Path, kind: str) -> tuple[str | None, int | None]:
    """The HF directory's own say on the ``kind`` (bos/eos) token: its text in tokenizer_config.json, its id in
    config.json."""
    text = None
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        entry = _read_json(tc, "tokenizer").get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
    token_id = _read_json(model_dir / "config.json", "model config").get(f"{kind}_token_id")
    return (text if isinstance(text, str) else None), (token_id if isinstance(token_id, int) else None)


def verify_gguf(path: Path, model_dir: Path) -> dict[str, Any]:
    """Read ``path`` back with ``gguf.GGUFReader`` and check it against the Hugging Face directory ``model_dir``.

    Checks: the architecture; every tensor llama.cpp's loader asks for present with its shape and the type the file
    type implies, and no other; the hyperparameters (context and embedding length, block count, feed-forward length,
    head counts, RoPE base / dimensions / scaling, norm epsilon, vocab size) equal to config.json; the tokenizer
    (``tokenizer.ggml.model``, one token and token type per vocab entry, merges and pre-tokenizer for BPE, scores for
    sentencepiece, bos/eos ids that point at the declared tokens). Raises ``ExportFailed`` naming what is missing or
    wrong; returns a summary dict."""
    path, model_dir = Path(path), Path(model_dir)
    hp = _hparams(_read_json(model_dir / "config.json", "model config"))
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupted: the reader fails while parsing header, KV or tensor infos
        raise ExportFailed(f"GGUF {path.name} is not readable: {type(e).__name__}: {e}") from None
    problems: list[str] = []

    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != hp.arch_name:
        raise ExportFailed(f"GGUF {path.name}: general.architecture is {arch!r}, the model is {hp.arch_name!r}")
    file_type = _field(reader, gguf.Keys.General.FILE_TYPE)
    dtype = next((d for d, t in _FILE_TYPES.items() if t == file_type), None)
    if dtype is None:
        raise ExportFailed(f"GGUF {path.name}: general.file_type {file_type!r} is not one this exporter writes (f16, q8_0)")

    # tensors
    expected = _expected_tensors(hp)
    present = {t.name: t for t in reader.tensors}
    missing = [n for n in expected if n not in present]
    if missing:
        problems.append(f"missing tensors {', '.join(missing[:6])}" + (f" (+{len(missing) - 6})" if len(missing) > 6 else ""))
    unexpected = [n for n in present if n not in expected]
    if unexpected:
        problems.append(f"unexpected tensors {', '.join(unexpected[:6])}")
    size = path.stat().st_size
    for name, t in present.items():
        if name not in expected:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF stores ggml's order: innermost dimension first
        if shape != expected[name]:
            problems.append(f"{name} has shape {list(shape)}, config.json implies {list(expected[name])}")
            continue
        want = _tensor_qtype(hp, name, shape, dtype)
        if t.tensor_type != want:
            problems.append(f"{name} is {t.tensor_type.name}, a {dtype} file has it {want.name}")
        elif t.n_bytes != _nbytes(shape, want) or t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            problems.append(f"{name}'s data is cut short")

    # hyperparameters
    K = gguf.Keys
    want_kv: dict[str, Any] = {
        K.LLM.CONTEXT_LENGTH: hp.n_ctx, K.LLM.EMBEDDING_LENGTH: hp.n_embd, K.LLM.BLOCK_COUNT: hp.n_layer,
        K.LLM.FEED_FORWARD_LENGTH: hp.n_ff, K.Attention.HEAD_COUNT: hp.n_head,
    }
    if hp.model_type == "gpt2":
        want_kv[K.Attention.LAYERNORM_EPS] = hp.norm_eps
    else:
        want_kv[K.Attention.HEAD_COUNT_KV] = hp.n_head_kv
        want_kv[K.Attention.LAYERNORM_RMS_EPS] = hp.norm_eps
        if hp.rope_theta is not None:
            want_kv[K.Rope.FREQ_BASE] = hp.rope_theta
        if hp.head_dim_in_config:
            want_kv[K.Attention.KEY_LENGTH] = want_kv[K.Attention.VALUE_LENGTH] = hp.head_dim
        if hp.rope_type in ("linear", "yarn"):
            want_kv[K.Rope.SCALING_TYPE] = hp.rope_type
            want_kv[K.Rope.SCALING_FACTOR] = float(hp.rope["factor"])
        if hp.model_type == "llama":
            want_kv[K.LLM.VOCAB_SIZE] = hp.n_vocab
            want_kv[K.Rope.DIMENSION_COUNT] = hp.head_dim
    for key, value in want_kv.items():
        key = key.format(arch=hp.arch_name)
        got = _field(reader, key)
        if got is None:
            problems.append(f"metadata {key} is missing")
        elif not _same(got, value):
            problems.append(f"metadata {key} is {got!r}, config.json has {value!r}")

    # tokenizer
    tok_model = _field(reader, K.Tokenizer.MODEL)
    tokens = _field(reader, K.Tokenizer.LIST) or []
    if tok_model not in ("gpt2", "llama"):
        problems.append(f"tokenizer.ggml.model is {tok_model!r} (expected 'gpt2' or 'llama')")
    if len(tokens) != hp.n_vocab:
        problems.append(f"tokenizer.ggml.tokens has {len(tokens)} tokens, config.json vocab_size is {hp.n_vocab}")
    n_types = len(reader.fields[K.Tokenizer.TOKEN_TYPE].data) if K.Tokenizer.TOKEN_TYPE in reader.fields else 0
    if n_types != hp.n_vocab:
        problems.append(f"tokenizer.ggml.token_type has {n_types} entries for {hp.n_vocab} tokens")
    pre = _field(reader, K.Tokenizer.PRE)
    if tok_model == "gpt2":
        if K.Tokenizer.MERGES not in reader.fields or not reader.fields[K.Tokenizer.MERGES].data:
            problems.append("tokenizer.ggml.merges is missing (a BPE tokenizer needs its merges)")
        if not pre:
            problems.append("tokenizer.ggml.pre is missing (llama.cpp's BPE pre-tokenizer)")
    if tok_model == "llama":
        n_scores = len(reader.fields[K.Tokenizer.SCORES].data) if K.Tokenizer.SCORES in reader.fields else 0
        if n_scores != hp.n_vocab:
            problems.append(f"tokenizer.ggml.scores has {n_scores} entries for {hp.n_vocab} tokens")
    special_ids: dict[str, int | None] = {}
    for kind, key in (("bos", K.Tokenizer.BOS_ID), ("eos", K.Tokenizer.EOS_ID)):
        text, config_id = _declared_special(model_dir, kind)
        got = special_ids[kind] = _field(reader, key)
        if got is None:
            if text is not None or config_id is not None:
                problems.append(f"{key} is missing (the model declares a {kind} token)")
            continue
        if not 0 <= got < len(tokens):
            problems.append(f"{key} {got} is outside the vocabulary")
        elif text is not None and tokens[got] != text and got != config_id:
            problems.append(f"{key} {got} is token {tokens[got]!r}, the tokenizer's {kind} token is {text!r}")
        elif text is None and config_id is not None and got != config_id:
            problems.append(f"{key} is {got}, config.json has {kind}_token_id {config_id}")

    if problems:
        raise ExportFailed(f"GGUF {path.name} does not match the model: " + "; ".join(problems))
    return {"architecture": hp.arch_name, "dtype": dtype, "tensors": len(present), "bytes": size,
            "tied_embeddings": hp.tied, "context_length": hp.n_ctx, "embedding_length": hp.n_embd, "block_count": hp.n_layer,
            "vocab_size": hp.n_vocab, "tokenizer": tok_model, "tokenizer_pre": pre, "bos_token_id": special_ids["bos"],
            "eos_token_id": special_ids["eos"], "name": _field(reader, K.General.NAME)}

