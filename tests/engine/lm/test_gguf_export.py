"""GGUF export of Hugging Face causal LMs (engine/lm/gguf_export/): llama, qwen2 and gpt2 written as f16 and q8_0, read
back with gguf's own reader and compared with the torch weights through a name table and layout rules written here
(not the exporter's), plus the refusals (unknown model type, broken directory) and a corrupted file failing the check."""

from __future__ import annotations

import json
import re
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.errors import ExportFailed, Unsupported
from engine.lm import gguf_export
from engine.lm.gguf_export import GGUF_ARCHITECTURES, verify_gguf, write_gguf
from tests.support import lm

ARCHS = ("llama", "qwen2", "gpt2")
# Hugging Face tensor name → llama.cpp's (the names llama.cpp's loader asks for), per architecture; {n} is the layer.
NAMES = {
    "llama": {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.{n}.input_layernorm.weight": "blk.{n}.attn_norm.weight",
        "model.layers.{n}.post_attention_layernorm.weight": "blk.{n}.ffn_norm.weight",
        "model.layers.{n}.self_attn.q_proj.weight": "blk.{n}.attn_q.weight",
        "model.layers.{n}.self_attn.k_proj.weight": "blk.{n}.attn_k.weight",
        "model.layers.{n}.self_attn.v_proj.weight": "blk.{n}.attn_v.weight",
        "model.layers.{n}.self_attn.o_proj.weight": "blk.{n}.attn_output.weight",
        "model.layers.{n}.mlp.gate_proj.weight": "blk.{n}.ffn_gate.weight",
        "model.layers.{n}.mlp.up_proj.weight": "blk.{n}.ffn_up.weight",
        "model.layers.{n}.mlp.down_proj.weight": "blk.{n}.ffn_down.weight",
    },
    "gpt2": {
        "transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight",
        "transformer.h.{n}.ln_1.weight": "blk.{n}.attn_norm.weight", "transformer.h.{n}.ln_1.bias": "blk.{n}.attn_norm.bias",
        "transformer.h.{n}.ln_2.weight": "blk.{n}.ffn_norm.weight", "transformer.h.{n}.ln_2.bias": "blk.{n}.ffn_norm.bias",
        "transformer.h.{n}.attn.c_attn.weight": "blk.{n}.attn_qkv.weight",
        "transformer.h.{n}.attn.c_attn.bias": "blk.{n}.attn_qkv.bias",
        "transformer.h.{n}.attn.c_proj.weight": "blk.{n}.attn_output.weight",
        "transformer.h.{n}.attn.c_proj.bias": "blk.{n}.attn_output.bias",
        "transformer.h.{n}.mlp.c_fc.weight": "blk.{n}.ffn_up.weight", "transformer.h.{n}.mlp.c_fc.bias": "blk.{n}.ffn_up.bias",
        "transformer.h.{n}.mlp.c_proj.weight": "blk.{n}.ffn_down.weight",
        "transformer.h.{n}.mlp.c_proj.bias": "blk.{n}.ffn_down.bias",
    },
}
NAMES["qwen2"] = {**NAMES["llama"], **{f"model.layers.{{n}}.self_attn.{p}_proj.bias": f"blk.{{n}}.attn_{p}.bias" for p in "qkv"}}
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 24  # lm.build_model's defaults: hidden 96, 4 heads, 2 kv heads


def gguf_name(arch: str, hf_name: str) -> str:
    for pattern, target in NAMES[arch].items():
        m = re.fullmatch(re.escape(pattern).replace(r"\{n\}", r"(\d+)"), hf_name)
        if m:
            return target.replace("{n}", m.group(1)) if m.groups() else target
    raise AssertionError(f"no llama.cpp name for {hf_name}")


def to_hf_layout(arch: str, hf_name: str, a: np.ndarray) -> np.ndarray:
    """A GGUF tensor (numpy order) back in the Hugging Face checkpoint's layout."""
    if arch == "gpt2" and a.ndim == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return a.T  # Conv1D keeps [in, out]
    if arch == "llama" and re.search(r"\.(q|k)_proj\.weight$", hf_name):
        # llama.cpp's rope rotates adjacent pairs (2i, 2i+1); Hugging Face's rotates (i, i + d/2): rows were interleaved.
        heads = HEADS if ".q_proj." in hf_name else KV_HEADS
        return a.reshape(heads, HEAD_DIM // 2, 2, -1).transpose(0, 2, 1, 3).reshape(a.shape)
    return a


@pytest.fixture(scope="module")
def tok():
    return lm.tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: lm.save_model_dir(lm.build_model(tok, arch), tok, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def exports(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {(arch, dtype): (write_gguf(model_dirs[arch], out / f"{arch}-{dtype}.gguf", dtype=dtype), out / f"{arch}-{dtype}.gguf")
            for arch in ARCHS for dtype in ("f16", "q8_0")}


def test_the_architectures_are_llama_cpp_ones():
    assert set(ARCHS) <= set(GGUF_ARCHITECTURES)
    assert set(GGUF_ARCHITECTURES) <= {gguf.MODEL_ARCH_NAMES[a] for a in gguf.MODEL_ARCH}


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_reads_back_with_every_weight(arch, dtype, model_dirs, exports):
    facts, path = exports[arch, dtype]
    summary = verify_gguf(path, model_dirs[arch])
    weights = load_file(str(model_dirs[arch] / "model.safetensors"))
    config = json.loads((model_dirs[arch] / "config.json").read_text())
    assert facts["architecture"] == summary["architecture"] == arch and facts["dtype"] == summary["dtype"] == dtype
    assert facts["bytes"] == path.stat().st_size and facts["tensors"] == summary["tensors"]

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    mapped = {gguf_name(arch, n): n for n in weights}
    assert set(tensors) == set(mapped), "every HF weight is one GGUF tensor and nothing else"
    assert ("output.weight" in tensors) == (not config.get("tie_word_embeddings", arch == "gpt2"))
    for name, t in tensors.items():
        w = weights[mapped[name]]
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            assert dtype == "q8_0" and w.ndim == 2
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            # q8_0: blocks of 32 values along a row, int8 times an f16 scale d (block absmax / 127, so |max| = 127 d):
            # each value within half a step, plus 127 times the scale's f16 rounding (2^-11 d).
            d = np.repeat(np.abs(deq).reshape(-1, 32).max(axis=1) / 127, 32).reshape(deq.shape)
            got, bound = to_hf_layout(arch, mapped[name], deq), to_hf_layout(arch, mapped[name], 0.57 * d + 1e-9)
            assert got.shape == w.shape and (np.abs(got - w) <= bound).all(), name
            continue
        got = to_hf_layout(arch, mapped[name], np.asarray(t.data))
        assert got.shape == w.shape, name
        if w.ndim == 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, w), name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and dtype == "f16", name
            assert np.array_equal(got, w.astype(np.float16)), name

    fields = reader.fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == config["vocab_size"] == len(fields["tokenizer.ggml.token_type"].data)
    assert tokens[fields["tokenizer.ggml.bos_token_id"].contents()] == lm.BOS
    assert tokens[fields["tokenizer.ggml.eos_token_id"].contents()] == lm.EOS
    merges = json.loads((model_dirs[arch] / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in merges]
    assert fields[f"{arch}.block_count"].contents() == 4 and fields[f"{arch}.embedding_length"].contents() == 96
    assert fields[f"{arch}.feed_forward_length"].contents() == 256 and fields[f"{arch}.context_length"].contents() == 256


def test_llama_q_k_layout_gives_the_same_attention_scores_under_llama_cpp_rope(model_dirs, exports):
    """The permuted q/k rows with llama.cpp's rope (adjacent pairs) give the attention logits Hugging Face's
    rotate-half rope gives with the original rows: the layout is right for the computation, not just invertible."""
    weights = load_file(str(model_dirs["llama"] / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(exports["llama", "f16"][1]).tensors}
    rng = np.random.default_rng(0)
    x, pos = rng.standard_normal((5, 96)), np.arange(5)
    inv = 1.0 / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    cos, sin = np.cos(pos[:, None] * inv), np.sin(pos[:, None] * inv)  # [5, HEAD_DIM/2]

    def rope_halves(v):  # Hugging Face: rotate_half pairs dims (i, i + d/2)
        a, b = v[..., : HEAD_DIM // 2], v[..., HEAD_DIM // 2:]
        return np.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def rope_pairs(v):  # llama.cpp (LLAMA_ROPE_TYPE_NORM): pairs dims (2i, 2i + 1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]
        return out

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(5, HEADS, HEAD_DIM))
        k = rope((x @ wk.T).reshape(5, KV_HEADS, HEAD_DIM))
        return np.einsum("qhd,khd->hqk", q, np.repeat(k, HEADS // KV_HEADS, axis=1))

    hf = scores(weights["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.k_proj.weight"],
                rope_halves)
    ours = scores(np.asarray(tensors["blk.0.attn_q.weight"].data, np.float64),
                  np.asarray(tensors["blk.0.attn_k.weight"].data, np.float64), rope_pairs)
    assert np.allclose(ours, hf, atol=1e-3, rtol=1e-2)
    naive = scores(weights["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.k_proj.weight"],
                   rope_pairs)
    assert not np.allclose(naive, hf, atol=1e-3, rtol=1e-2), "the check must be able to fail"


def test_tied_llama_omits_output_and_shards_convert_alike(tok, model_dirs, exports, tmp_path):
    model = lm.build_model(tok, "llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    tied = lm.save_model_dir(model, tok, tmp_path / "tied")
    facts = write_gguf(tied, tmp_path / "tied.gguf")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    assert facts["tied_embeddings"] and "output.weight" not in names and "token_embd.weight" in names
    verify_gguf(tmp_path / "tied.gguf", tied)

    sharded = tmp_path / "sharded"
    lm.build_model(tok, "qwen2").save_pretrained(sharded, max_shard_size="300KB")
    tok.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    write_gguf(sharded, tmp_path / "sharded.gguf")
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "sharded.gguf").tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exports["qwen2", "f16"][1]).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # same seed, same weights

    (sharded / sorted(sharded.glob("model-*.safetensors"))[-1].name).unlink()
    with pytest.raises(ExportFailed, match="shard"):
        write_gguf(sharded, tmp_path / "broken.gguf")


def test_sentencepiece_style_llama_tokenizer(tmp_path):
    """A Hugging Face llama tokenizer (BPE with byte fallback, ▁ for spaces) is written as llama.cpp's 'llama' vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    sp.train_from_iterator(lm.documents(20), trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    model_dir = lm.save_model_dir(lm.build_model(fast, "llama", layers=1), fast, tmp_path / "sp")
    facts = write_gguf(model_dir, tmp_path / "sp.gguf")
    summary = verify_gguf(tmp_path / "sp.gguf", model_dir)
    assert facts["tokenizer"] == summary["tokenizer"] == "llama"
    fields = gguf.GGUFReader(tmp_path / "sp.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(fast) == len(fields["tokenizer.ggml.scores"].data)
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE and tokens[summary["bos_token_id"]] == "<s>"


def test_bpe_pre_tokenizer_is_named_from_tokenizer_json_structure():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

    def split(pattern):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]}

    bpe = {"type": "BPE", "byte_fallback": False, "ignore_merges": False}
    pre = gguf_export._bpe_pre_from_structure
    assert pre({"model": bpe, "normalizer": None, "pre_tokenizer": {**byte_level, "use_regex": True}}) == "gpt-2"
    assert pre({"model": {**bpe, "ignore_merges": True}, "normalizer": None,
                "pre_tokenizer": split(gguf_export._LLAMA3_SPLIT)}) == "llama-bpe"
    assert pre({"model": bpe, "normalizer": {"type": "NFC"}, "pre_tokenizer": split(gguf_export._QWEN2_SPLIT)}) == "qwen2"
    assert pre({"model": bpe, "normalizer": None, "pre_tokenizer": split(r"\s+")}) is None
    assert pre({"model": bpe, "normalizer": None, "pre_tokenizer": {**byte_level, "add_prefix_space": True}}) is None


def test_unsupported_and_broken_inputs(model_dirs, tmp_path):
    fake = tmp_path / "bert"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(Unsupported, match="model_type 'bert'"):
        write_gguf(fake, tmp_path / "bert.gguf")
    with pytest.raises(Unsupported, match="q4_0"):
        write_gguf(model_dirs["llama"], tmp_path / "x.gguf", dtype="q4_0")

    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["llama"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(Unsupported, match="hidden_act 'gelu'"):
        write_gguf(broken, tmp_path / "x.gguf")
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ExportFailed, match=r"mlp\..*shape"):
        write_gguf(broken, tmp_path / "x.gguf")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ExportFailed, match="config.json"):
        write_gguf(broken, tmp_path / "x.gguf")
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ExportFailed, match="model.safetensors"):
        write_gguf(broken, tmp_path / "x.gguf")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ExportFailed, match="no model.safetensors"):
        write_gguf(broken, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp")), "a failed export leaves no file"


def test_corrupted_or_foreign_gguf_fails_verification(model_dirs, exports, tmp_path):
    good = exports["llama", "q8_0"][1]
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ExportFailed, match="cut.gguf"):
        verify_gguf(tmp_path / "cut.gguf", model_dirs["llama"])
    (tmp_path / "magic.gguf").write_bytes(b"XXXX" + data[4:])
    with pytest.raises(ExportFailed, match="not readable"):
        verify_gguf(tmp_path / "magic.gguf", model_dirs["llama"])
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(ExportFailed, match="not readable"):
        verify_gguf(tmp_path / "header.gguf", model_dirs["llama"])

    with pytest.raises(ExportFailed, match="architecture is 'llama', the model is 'qwen2'"):
        verify_gguf(good, model_dirs["qwen2"])
    other = tmp_path / "other"
    shutil.copytree(model_dirs["llama"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5, "rms_norm_eps": 1e-5}))
    with pytest.raises(ExportFailed) as e:
        verify_gguf(good, other)
    assert "missing tensors blk.4." in e.value.message and "llama.block_count is 4" in e.value.message
    assert "layer_norm_rms_epsilon" in e.value.message
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 600}))
    with pytest.raises(ExportFailed, match="512 tokens, config.json vocab_size is 600"):
        verify_gguf(good, other)


def test_sentencepiece_model_file(tmp_path):
    """A llama whose tokenizer is a sentencepiece tokenizer.model (needs the sentencepiece package, as the converter)."""
    spm = pytest.importorskip("sentencepiece")
    model_dir = tmp_path / "spm"
    model_dir.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lm.documents(20)), model_prefix=str(model_dir / "tokenizer"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))

    class Ids:  # what lm.build_model reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None

        def __len__(self):
            return sp.vocab_size()

    lm.build_model(Ids(), "llama", layers=1).save_pretrained(model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    facts = write_gguf(model_dir, tmp_path / "spm.gguf", dtype="q8_0")
    summary = verify_gguf(tmp_path / "spm.gguf", model_dir)
    assert facts["tokenizer"] == summary["tokenizer"] == "llama" and summary["bos_token_id"] == 1
    fields = gguf.GGUFReader(tmp_path / "spm.gguf").fields
    assert fields["tokenizer.ggml.tokens"].contents() == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert np.allclose(fields["tokenizer.ggml.scores"].contents(), [sp.get_score(i) for i in range(sp.vocab_size())])
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL and types[3] == gguf.TokenType.BYTE
