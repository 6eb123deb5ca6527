"""The budget of a generative-LM job (teacher task ``causal_lm``), from metadata alone; see :mod:`app.jobs.budget`.

The teacher's upload inspection recorded its parameters, vocabulary ``V``, hidden size ``h``, layers ``n`` and
context length; a ``jsonl`` dataset its characters. Tokens are estimated as characters / 4 (English BPE averages
3.5-4.5 characters a token; the smaller ratio would only raise the estimate a little) and listed as an assumption.

* **student parameters**: ``derive`` keeps ``ceil(n·depth)`` layers: ``P_emb + P_layer·kept`` (MLP share scaled by
  ``width``) with ``P_emb`` = ``V·h`` (×2 when the head is not tied) and ``P_layer = (P_t − P_emb) / n``;
  ``hf_causal_lm`` counts ``12·h²`` per layer (attention 4h², MLP 8h² for the usual 4h intermediate; the given
  intermediate size when set) plus ``2·V·h``; an uploaded student its registered parameters.
* **memory**: teacher ``4·P_t``; student ``4·P_s·4`` (weights, gradients, AdamW's two moments) + a best-weights copy;
  activations ``batch·L·(h·n_s·16 + V)·4·2`` (per token and layer about 16 floats of h, the logits); the teacher
  cache ``tokens·(k·(2+4) or V·2)`` bytes (top-k float16 log-probs + int32 ids, or the float16 distribution),
  memory-mapped beyond 256 MiB and then not counted.
* **FLOPs**: training ``6·P_s`` per token per epoch (forward 2P, backward 4P), the teacher's cache ``2·P_t`` per
  token once, held-out scoring per epoch ``2·P_s`` per held-out token; doubled for ``baseline``. A ``generate`` step
  costs ``2·P_t`` per prompt token and per written token (``prompts · num_return_sequences · max_new_tokens``), and
  the distill steps after it train on those tokens; ``on_policy`` adds the student's sampling (``2·P_s`` per
  sampled token) and a live teacher pass (``2·P_t``) for that share of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from app.db.models import Dataset, Model
from jobspec import DerivedStudent, DistillStep, GenerateStep, JobSpec, UploadedStudent
from jobspec.students import HFCausalLMStudent

CHARS_PER_TOKEN = 4
CACHE_MEMORY_LIMIT = 256 << 20


def _hf(model: Model | None) -> Mapping[str, Any]:
    hf = (model.io_schema or {}).get("hf") if model is not None else None
    return hf if isinstance(hf, Mapping) else {}


def student_parameters(spec: JobSpec, teacher: Model | None, student_model: Model | None) -> int:
    t = _hf(teacher)
    vocab, hidden, layers = int(t.get("vocab_size") or 1), int(t.get("hidden_size") or 1), int(t.get("layers") or 1)
    embed = 2 * vocab * hidden
    s = spec.student
    if isinstance(s, DerivedStudent):
        per_layer = max(0, teacher.num_parameters - embed) / layers
        kept = max(1, math.ceil(layers * s.derive.depth))
        return int(embed + per_layer * kept * (1 + 2 * s.derive.width) / 3)  # the MLP is ~2/3 of a layer
    if isinstance(s, HFCausalLMStudent):
        h = int(s.config.get("hidden_size", hidden))
        n = int(s.config.get("layers", layers))
        inter = int(s.config.get("intermediate_size", 4 * h))
        return int(2 * vocab * h + n * (4 * h * h + 2 * h * inter))
    if isinstance(s, UploadedStudent) and student_model is not None:
        return int(student_model.num_parameters)
    return int(teacher.num_parameters) if teacher is not None else 0


def estimate_lm(spec: JobSpec, teacher: Model | None, datasets: Mapping[str, Dataset], student_model: Model | None):
    """An :class:`app.jobs.budget.Estimate` for a causal_lm job (formulas in the module docstring). A served
    teacher (``teacher`` None) costs this deployment no weights and no FLOPs; the student's facts size the rest."""
    from app.jobs.budget import Estimate

    t = _hf(teacher) or _hf(student_model)
    vocab, hidden = int(t.get("vocab_size") or 1), int(t.get("hidden_size") or 1)
    p_t = int(teacher.num_parameters) if teacher is not None else 0
    p_s = student_parameters(spec, teacher, student_model)
    layers_s = max(1, int(t.get("layers") or 1))
    notes = [f"tokens estimated as characters / {CHARS_PER_TOKEN}"]

    def tokens(ds_id: str | None) -> int:
        ds = datasets.get(ds_id or "")
        chars = int(((ds.schema_ or {}).get("characters") if ds is not None else 0) or 0)
        return max(1, chars // CHARS_PER_TOKEN)

    val_tokens = int(tokens(spec.heldout_dataset_id()) * (1 if spec.eval_dataset_id else spec.val_fraction))
    flops, peak = 0.0, {"teacher weights": 4 * p_t, "student training state": 4 * p_s * 5}
    generated: dict[int, int] = {}
    for i, step in enumerate(spec.steps):
        if isinstance(step, GenerateStep):
            ds = datasets.get(step.dataset_id or spec.dataset_id or "")
            prompts = int(ds.num_rows) if ds is not None else 1
            written = prompts * step.num_return_sequences * step.max_new_tokens
            generated[i] = written + tokens(step.dataset_id or spec.dataset_id) * step.num_return_sequences
            flops += 2 * p_t * generated[i]
            continue
        if not isinstance(step, DistillStep):
            continue
        source = spec.generated_for(i)
        train_tokens = generated[source] if source is not None else tokens(spec.step_dataset_id(i))
        k = step.loss.top_k if hasattr(step.loss, "top_k") and step.loss.top_k else vocab
        cache = train_tokens * (k * 6 if k < vocab else vocab * 2)
        if cache <= CACHE_MEMORY_LIMIT:
            peak[f"step {i} teacher cache"] = cache
        acts = step.batch_size * step.max_seq_len * (hidden * layers_s * 16 + vocab) * 4 * 2
        peak[f"step {i} activations"] = max(peak.get(f"step {i} activations", 0), acts)
        flops += (6 * p_s * train_tokens + 2 * p_s * val_tokens) * step.epochs * (2 if spec.baseline else 1)
        flops += 2 * p_t * train_tokens
        flops += step.on_policy * train_tokens * step.epochs * 2 * (p_s + p_t)
    from app.settings import get_settings

    largest = ("teacher", p_t) if p_t >= p_s else ("student", p_s)
    return Estimate(parameters=largest[1], memory_bytes=int(sum(peak.values())), flops=int(flops),
                    seconds=flops / get_settings().budget_flops_per_second, largest=largest[0],
                    memory_items=dict(sorted(peak.items(), key=lambda kv: -kv[1])),
                    models={"teacher": p_t, "student": p_s}, assumptions=tuple(notes))
