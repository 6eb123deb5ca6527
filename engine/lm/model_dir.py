"""A zipped Hugging Face model directory (format ``hf_transformers``): unpack it safely, load it, describe it.

``unpack(zip_path, dest) -> Path`` checks the archive (:func:`safezip.check_zip`, then
:mod:`safezip.hf_model`: no code, no pickles, no ``auto_map``) and extracts it; ``load_causal_lm(directory)``
and ``load_tokenizer(directory)`` call ``from_pretrained`` with ``local_files_only=True``,
``trust_remote_code=False`` and ``use_safetensors=True``, so nothing is fetched and nothing but tensors and JSON
is read; the architecture must be built into transformers. ``facts(directory)`` is what the upload inspection
reports (architecture, parameters, vocabulary size, context length, dtype, a digest of the tokenizer's
vocabulary to compare students with).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

from engine.errors import InvalidModel
from safezip import UnsafeArchive, check_zip
from safezip.hf_model import CONFIG_FILES, MAX_CONFIG_BYTES, NotAnHFModel, check_hf_config, check_hf_members

# Never reach a hub (the executor has no network anyway: fail at once instead of retrying), no progress bars in logs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

#: Limits of the archive check inside the executor (the API applied the deployment's own at upload).
MAX_UNPACKED_BYTES = 64 * 1024**3
MAX_MEMBERS = 10_000


def unpack(zip_path: Path, dest: Path) -> Path:
    """Extract the model archive into ``dest`` after checking it; returns the directory holding config.json."""
    try:
        infos = check_zip(zip_path, max_total_bytes=MAX_UNPACKED_BYTES, max_ratio=1000.0, max_members=MAX_MEMBERS)
        names = [i.filename for i in infos]
        root = check_hf_members(names)
        sizes = {i.filename: i.file_size for i in infos}
        with zipfile.ZipFile(zip_path) as zf:
            for name in CONFIG_FILES:
                if root + name in names:
                    if sizes[root + name] > MAX_CONFIG_BYTES:  # read only what the limit allows
                        raise NotAnHFModel(f"{name} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
                    check_hf_config(name, zf.read(root + name))
            dest.mkdir(parents=True, exist_ok=True)
            for info in infos:  # names were checked by check_zip: no absolute paths, no '..'
                if not info.is_dir():
                    zf.extract(info, dest)
    except (UnsafeArchive, NotAnHFModel, zipfile.BadZipFile) as exc:
        raise InvalidModel(f"the hf_transformers archive is refused: {exc}") from None
    except OSError as exc:
        raise InvalidModel(f"cannot unpack the hf_transformers archive: {exc}") from None
    return dest / root.rstrip("/") if root else dest


def _config(directory: Path) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise InvalidModel(f"model_type {model_type!r} is not an architecture built into transformers; only "
                           "built-in architectures are accepted (no remote code)")
    return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def load_causal_lm(directory: Path, *, dtype: Any = None) -> Any:
    """The model in ``directory`` as an ``AutoModelForCausalLM`` (float32 unless ``dtype``), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _config(directory)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InvalidModel(f"model_type {config.model_type!r} has no causal language-model head in transformers "
                           "(task causal_lm needs a decoder such as llama, qwen2, mistral, gpt2)")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True, dtype=dtype or torch.float32)
    except Exception as exc:  # a broken file is the user's to fix, whatever transformers raises
        raise InvalidModel(f"cannot load the model: {type(exc).__name__}: {str(exc)[:500]}") from None
    return model.eval()


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved with the model; a padding token is set (the EOS token) when it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise InvalidModel(f"cannot load the tokenizer saved with the model (save it with "
                           f"tokenizer.save_pretrained(dir)): {type(exc).__name__}: {str(exc)[:300]}") from None
    if not getattr(tok, "is_fast", False) and not hasattr(tok, "get_vocab"):
        raise InvalidModel("the tokenizer has no vocabulary")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_digest(tok: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id, sorted) and special tokens: equal digests mean the same
    token ids mean the same strings, which token-level KD needs."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: v for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)}
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()


def _safetensors_facts(directory: Path) -> tuple[int, str]:
    """(parameters, dtype) from the safetensors headers alone."""
    total, dtypes = 0, set()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(int(d) for d in meta["shape"])
                dtypes.add(meta["dtype"])
    return total, ",".join(sorted(dtypes))


def facts(directory: Path) -> dict[str, Any]:
    """What the upload inspection reports about a model directory (loads the model to check it is complete)."""
    model = load_causal_lm(directory)
    tok = load_tokenizer(directory)
    config = model.config
    params, dtype = _safetensors_facts(directory)
    context = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                    if getattr(config, k, None)), None)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if len(tok) > vocab:
        raise InvalidModel(f"the tokenizer has {len(tok)} tokens but the model's output layer only {vocab}")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return {"model_type": config.model_type, "architectures": list(config.architectures or []),
            "num_parameters": int(sum(p.numel() for p in model.parameters())), "stored_elements": params,
            "vocab_size": vocab, "tokenizer_size": len(tok), "context_length": context, "dtype": dtype,
            "layers": layers, "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
            "tokenizer_sha256": tokenizer_digest(tok), "chat_template": bool(getattr(tok, "chat_template", None))}
