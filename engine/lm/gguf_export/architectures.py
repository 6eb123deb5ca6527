"""The architectures GGUF export converts: config.json → :class:`_Hparams` (refusing what llama.cpp cannot run), and
the ``<arch>.*`` hyperparameter metadata written from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gguf

from engine.errors import ExportFailed, Unsupported

#: Hugging Face ``model_type`` values this module converts (llama.cpp architectures of the same name).
GGUF_ARCHITECTURES = ("llama", "qwen2", "gpt2")
#: Output encodings: ``f16`` (llama.cpp ``MOSTLY_F16``) and ``q8_0`` (``MOSTLY_Q8_0``).
GGUF_DTYPES = ("f16", "q8_0")
_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gpt2": gguf.MODEL_ARCH.GPT2}
#: The Hugging Face classes whose checkpoints we know the tensor names of (config ``architectures``).
_HF_CLASSES = {"llama": ("LlamaForCausalLM",), "qwen2": ("Qwen2ForCausalLM",), "gpt2": ("GPT2LMHeadModel",)}
#: Hugging Face's default for ``tie_word_embeddings`` when config.json does not say.
_TIED_DEFAULT = {"llama": False, "qwen2": False, "gpt2": True}
#: GPT-2's tanh-approximated GELU is what llama.cpp's ``ggml_gelu`` computes.
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


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
