"""Reading a GGUF file back: :func:`verify_gguf` checks it against the model directory it was written from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engine.errors import ExportFailed
from engine.lm.gguf_export.architectures import _hparams
from engine.lm.gguf_export.tensors import _FILE_TYPES, _expected_tensors, _nbytes, _tensor_qtype
from engine.lm.gguf_export.weights import _read_json


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

