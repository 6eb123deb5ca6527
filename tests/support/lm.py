"""Small generative language models built inside the tests, on text every Python has.

The corpus is the CPython documentation shipped in ``pydoc_data.topics`` (about 1 MB of English prose and code).
:func:`tokenizer` trains a byte-level BPE tokenizer on it (the GPT-2 scheme, via ``tokenizers``);
:func:`build_model` makes a fresh Hugging Face causal LM of a given architecture (``llama``, ``qwen2``, ``gpt2``)
sized for a CPU test; :func:`train_teacher` trains one on the corpus for a fixed number of steps, seeded, and
:func:`save_model_dir` writes the Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files)
that Distillery accepts zipped as format ``hf_transformers``.
"""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path
from typing import Any

#: Special tokens of the test tokenizer (BOS/EOS/PAD).
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def documents(limit: int | None = None) -> list[str]:
    """The corpus: one document per pydoc topic, in a fixed (sorted) order, whitespace-normalised."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        if len(text) > 200:
            docs.append(text)
    return docs[:limit] if limit else docs


def split_documents(held_out: int = 12, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out) documents: a seeded shuffle, the last ``held_out`` documents held out."""
    docs = documents()
    random.Random(seed).shuffle(docs)
    return docs[:-held_out], docs[-held_out:]


def tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on the corpus, with ``<s>``/``</s>``/``<pad>`` and a
    chat template (ChatML-like) so ``messages`` datasets work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return fast


def build_model(tok: Any, architecture: str = "llama", *, hidden: int = 96, layers: int = 4, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 256, context: int = 256, seed: int = 0) -> Any:
    """A fresh causal LM (``llama`` | ``qwen2`` | ``gpt2``) over ``tok``'s vocabulary, seeded."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id}
    if architecture == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, n_positions=context,
                            **common)
    else:
        cls = LlamaConfig if architecture == "llama" else Qwen2Config
        config = cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=context,
                     tie_word_embeddings=False, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def blocks(tok: Any, docs: list[str], seq_len: int) -> Any:
    """The documents tokenised, each followed by EOS, concatenated and cut into ``[N, seq_len]`` blocks."""
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d)["input_ids"] + [tok.eos_token_id])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def train_teacher(tok: Any, docs: list[str], *, architecture: str = "llama", steps: int = 300, seq_len: int = 64,
                  batch: int = 16, lr: float = 3e-3, seed: int = 0, **sizes: Any) -> Any:
    """A causal LM trained on ``docs`` with AdamW and a cosine schedule for ``steps`` steps (seeded)."""
    import torch

    model = build_model(tok, architecture, seed=seed, **sizes)
    data = blocks(tok, docs, seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def perplexity(model: Any, tok: Any, docs: list[str], seq_len: int = 64) -> float:
    """exp(mean next-token cross-entropy) over ``docs`` cut into ``seq_len`` blocks."""
    import math

    import torch

    data = blocks(tok, docs, seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, data.shape[0], 32):
            x = data[i:i + 32]
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(loss) * n
            count += n
    return math.exp(total / count)


def save_model_dir(model: Any, tok: Any, directory: Path) -> Path:
    """``config.json`` + ``model.safetensors`` + tokenizer files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def zip_dir(directory: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    """``directory``'s files zipped flat into ``out`` (plus ``extra`` members: name → bytes)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(directory.iterdir()):
            if f.is_file():
                z.write(f, f.name)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


#: The shared teacher's recipe: strong enough that distilling into half its layers beats training them on the data
#: alone (measured: held-out perplexity teacher 17.5, KD student 18.3, data-only twin 18.7; see tests/engine/lm).
TEACHER_STEPS = 1200


def shared_teacher(tmp_path_factory: Any) -> tuple[Path, Path]:
    """(model directory, zip) of the trained 4-layer Llama teacher, built once per test run (every xdist worker
    loads the same files)."""
    from tests.support.shared import shared_root

    return _shared_teacher_in(shared_root(tmp_path_factory))


def _shared_teacher_in(root: Path) -> tuple[Path, Path]:
    from tests.support.shared import built_once_in

    with built_once_in(root, "lm-teacher") as (directory, build):
        if build:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                tok = tokenizer()
                model = train_teacher(tok, split_documents()[0], steps=TEACHER_STEPS)
            finally:
                torch.set_num_threads(threads)
            save_model_dir(model, tok, directory / "teacher")
            zip_dir(directory / "teacher", directory / "teacher.zip")
    return directory / "teacher", directory / "teacher.zip"


def prebuild_shared_teacher(root: Path, log: Path) -> Any:
    """Start building the shared teacher under ``root`` in a background process at the lowest CPU priority, and
    return it (a ``subprocess.Popen``). Its 75 s of training then fill CPU time the suite leaves idle (servers
    starting, leases running out) instead of holding up the first test that needs it while the other workers
    wait. The usual lock decides who builds: if a test gets there first, this process just waits and exits."""
    import os
    import subprocess
    import sys

    code = "import sys; from pathlib import Path; from tests.support.lm import _shared_teacher_in; " \
           "_shared_teacher_in(Path(sys.argv[1]))"
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).parents[2], preexec_fn=lambda: os.nice(19))


def logits(model: Any, ids: Any) -> Any:
    """``model``'s logits [B, T, V] for ``ids`` in eval mode, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def state(model: Any) -> dict[str, Any]:
    """A detached copy of ``model``'s state dict (to compare weights before and after)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
