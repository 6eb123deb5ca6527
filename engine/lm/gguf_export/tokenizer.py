"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``): byte-level BPE → model ``gpt2`` with its llama.cpp
pre-tokenizer name, sentencepiece-style → model ``llama`` with scores."""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from engine.errors import ExportFailed, Unsupported
from engine.lm.gguf_export.architectures import _Hparams
from engine.lm.gguf_export.weights import _read_json

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
