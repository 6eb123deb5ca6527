"""Text the models write during a job: the teacher's completions (``generate`` steps) and the student's own samples
(``on_policy`` batches).

* :func:`generate_records` - sequence-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"; the
  regime of hosted distillation services): the teacher completes every prompt ``num_return_sequences`` times with the
  step's sampling settings; the ``{"prompt", "completion"}`` records are what the following distill steps train on.
* :func:`on_policy_batch` - GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"): a batch's
  continuations replaced by what the student samples from the batch's prompts, so the student learns from the
  teacher's distributions on the sequences it actually produces (the train/inference mismatch of off-policy KD).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import jobspec

#: Prompts per teacher generation batch.
GENERATE_BATCH = 8


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """A prompt's token ids as :func:`engine.lm.text_data.tokenize` builds them (BOS, then the text)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        att[i, width - len(r):] = 1
    return ids, att


def _sample_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def generate_records(model: Any, tok: Any, prompts: list[str], step: jobspec.GenerateStep, device: torch.device,
                     seed: int, max_prompt_tokens: int, check_stop: Callable[[str], None]) -> list[dict[str, str]]:
    """The teacher's completions: one ``{"prompt", "completion"}`` record per prompt and returned sequence, in the
    prompts' order. Prompts longer than ``max_prompt_tokens`` keep their last tokens (the end of a prompt is what
    the completion continues). Seeded: the same job writes the same text on the same machine."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    model.eval()
    out: list[dict[str, str]] = []
    with torch.no_grad():
        for start in range(0, len(prompts), GENERATE_BATCH):
            check_stop("while the teacher generates")
            chunk = prompts[start:start + GENERATE_BATCH]
            ids, att = _left_padded([prompt_ids(tok, p)[-max_prompt_tokens:] for p in chunk], pad)
            gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                 max_new_tokens=step.max_new_tokens, num_return_sequences=step.num_return_sequences,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id,
                                 **_sample_kwargs(step.temperature, step.top_p))
            texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            for i, text in enumerate(texts):
                out.append({"prompt": chunk[i // step.num_return_sequences], "completion": text})
    return out


def on_policy_batch(student: Any, ids: torch.Tensor, att: torch.Tensor, target: torch.Tensor, *, eos: int | None,
                    pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch with its continuations sampled by ``student`` (temperature 1): the common prompt is the tokens
    before the first target of any row (half the sequence for text blocks, whose every token is a target); the
    student writes up to the rest of the sequence. Returns (input_ids, attention_mask, target_mask) [B, L'] with the
    sampled tokens as targets (up to and including EOS; what follows is padding)."""
    length = ids.shape[1]
    first = [int(t.nonzero()[0]) if bool(t.any()) else length for t in target]
    p = min(first)
    if p <= 0 or p >= length - 1:  # text blocks (targets from the start), or prompts that fill the sequence
        p = max(1, length // 2)
    p = min(p, int(att.sum(dim=1).min()))  # every row holds real tokens up to the prompt's end
    was = student.training
    student.eval()
    with torch.no_grad():
        gen = student.generate(input_ids=ids[:, :p], attention_mask=att[:, :p], max_new_tokens=length - p,
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                               eos_token_id=eos)
    student.train(was)
    new_att = torch.ones_like(gen)
    if eos is not None:
        is_eos = gen[:, p:] == eos
        after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
        new_att[:, p:] = (~after).long()
    new_target = torch.zeros_like(gen, dtype=torch.bool)
    new_target[:, p:] = new_att[:, p:].bool()
    return gen, new_att, new_target
