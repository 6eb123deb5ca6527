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

from engine.lm.gguf_export.architectures import GGUF_ARCHITECTURES, GGUF_DTYPES
# Tokenizer helpers the tests exercise directly, reachable as ``gguf_export.<name>`` as before the split.
from engine.lm.gguf_export.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, _bpe_pre_from_structure
from engine.lm.gguf_export.verify import verify_gguf
from engine.lm.gguf_export.writer import write_gguf

__all__ = ["GGUF_ARCHITECTURES", "GGUF_DTYPES", "verify_gguf", "write_gguf",
           "_LLAMA3_SPLIT", "_QWEN2_SPLIT", "_bpe_pre_from_structure"]
