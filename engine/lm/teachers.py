"""The teacher of a causal-LM job, local or served, behind one interface the pipeline uses.

* :class:`LocalTeacher` - an uploaded ``hf_transformers`` model run in the executor;
* :class:`ServedTeacher` - a model behind an OpenAI-compatible endpoint (:mod:`.endpoint`): its targets are its
  top-``k`` log-probabilities (at temperature 1), its completions come from the endpoint, and it has no weights to
  measure, derive from or run on-policy.

Each offers: ``val_targets(val)`` (held-out targets per evaluation batch, or None to score live), ``scores(val)``
(held-out ``perplexity`` / ``nll``), ``fill_cache(data, loss, directory, check_stop)`` (the training sequences'
targets, computed once), ``complete(tok, prompts, step, seed, check_stop)`` (a generate step's records),
``greedy(tok, ids)`` (a report sample) and ``row(scores, prompt, pad_id)`` (the report's teacher row).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import jobspec
from engine.lm import divergence, generation, report as lm_report
from engine.lm.endpoint import EndpointTeacher
from engine.lm.text_data import TokenBlocks
from engine.lm.training import EVAL_BATCH, batches, evaluate, fill_cache, teacher_val_logits


class LocalTeacher:
    """An uploaded causal LM, in eval mode on the job's device, with frozen weights."""

    def __init__(self, model: Any, device: torch.device):
        self.model, self.device = model, device
        self.name = model.config.model_type

    def val_targets(self, val: TokenBlocks) -> list[Any] | None:
        return teacher_val_logits(self.model, val, self.device)

    def scores(self, val: TokenBlocks) -> dict[str, float]:
        return evaluate(self.model, val, self.device)

    def fill_cache(self, data: TokenBlocks, loss: Any, directory: Path, check_stop: Callable[[str], None]
                   ) -> divergence.TeacherCache:
        return fill_cache(self.model, data, loss, self.device, directory, check_stop)

    def complete(self, tok: Any, prompts: list[str], step: jobspec.GenerateStep, seed: int, max_prompt_tokens: int,
                 check_stop: Callable[[str], None]) -> list[dict[str, str]]:
        return generation.generate_records(self.model, tok, prompts, step, self.device, seed, max_prompt_tokens,
                                           check_stop)

    def greedy(self, tok: Any, ids: torch.Tensor) -> str:
        return lm_report.greedy(self.model, tok, ids)

    def row(self, scores: dict[str, float], prompt: torch.Tensor, pad_id: int | None) -> dict[str, Any]:
        return lm_report.model_row(self.model, {**scores, "agreement": 1.0, "kl": 0.0}, prompt, pad_id)


class ServedTeacher:
    """A causal LM behind an OpenAI-compatible endpoint, reached through the worker's proxy."""

    def __init__(self, endpoint: EndpointTeacher):
        self.endpoint, self.model = endpoint, None
        self.name = f"served:{endpoint.model}"
        self._val: tuple[list[divergence.TopK], torch.Tensor] | None = None

    def _scored_val(self, val: TokenBlocks) -> tuple[list[divergence.TopK], torch.Tensor]:
        if self._val is None:
            targets, nll_sum = [], torch.zeros(())
            for rows in batches(val.n, EVAL_BATCH):
                b = val.select(rows)
                top, actual = self.endpoint.score(b.input_ids, b.attention_mask)
                targets.append(top)
                mask = b.target_mask[:, 1:] & b.attention_mask[:, 1:].bool()
                nll_sum = nll_sum - actual[mask].sum()
            self._val = (targets, nll_sum)
        return self._val

    def val_targets(self, val: TokenBlocks) -> list[Any]:
        return self._scored_val(val)[0]

    def scores(self, val: TokenBlocks) -> dict[str, float]:
        import math

        nll = float(self._scored_val(val)[1]) / max(1, val.tokens())
        return {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": float(val.tokens())}

    def fill_cache(self, data: TokenBlocks, loss: Any, directory: Path, check_stop: Callable[[str], None]
                   ) -> divergence.TeacherCache:
        k = self.endpoint.top_logprobs if loss.config.top_k is None else min(loss.config.top_k, self.endpoint.top_logprobs)
        cache = divergence.TeacherCache(data.n, data.input_ids.shape[1] - 1, vocab=len(self.endpoint.tok), top_k=k,
                                        directory=directory)
        for rows in batches(data.n, EVAL_BATCH):
            check_stop("while the served teacher scores the data")
            b = data.select(rows)
            top, _ = self.endpoint.score(b.input_ids, b.attention_mask)
            cache.put(rows, divergence.TopK(top.logprobs[..., :k], top.indices[..., :k]))
        return cache

    def complete(self, tok: Any, prompts: list[str], step: jobspec.GenerateStep, seed: int, max_prompt_tokens: int,
                 check_stop: Callable[[str], None]) -> list[dict[str, str]]:
        check_stop("before the served teacher generates")
        texts = self.endpoint.complete(prompts, max_tokens=step.max_new_tokens, temperature=step.temperature,
                                       top_p=step.top_p, n=step.num_return_sequences, seed=seed)
        n = step.num_return_sequences
        return [{"prompt": prompts[i // n], "completion": text} for i, text in enumerate(texts)]

    def greedy(self, tok: Any, ids: torch.Tensor) -> str:
        prompt = tok.decode(ids[0], skip_special_tokens=True)
        return self.endpoint.complete([prompt], max_tokens=lm_report.SAMPLE_NEW_TOKENS, temperature=0.0)[0]

    def row(self, scores: dict[str, float], prompt: torch.Tensor, pad_id: int | None) -> dict[str, Any]:
        return {"served": {"model": self.endpoint.model}, "num_parameters": None, "size_bytes": None,
                "latency_ms": {"batch_1": None, "batch_32": None}, "agreement": 1.0, "kl": 0.0,
                **{k: float(scores[k]) for k in ("perplexity", "nll")}}
