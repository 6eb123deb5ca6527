"""Token-level knowledge distillation for generative LMs: divergences between next-token distributions. The
cache of teacher targets computed once over fixed data (:class:`~engine.lm.cache.TeacherCache`) and the top-k
targets (:class:`~engine.lm.topk.TopK`) have modules of their own, and are re-exported here.

Inputs and outputs (``B`` sequences, ``T`` positions, ``V`` vocabulary, ``N`` tokens where ``mask`` is True)::

    teacher_targets(teacher_logits [B, T, V], temperature, top_k) -> log-probs float32 [B, T, V]  (top_k None or >= V)
                                                                    or TopK(logprobs [B, T, k], indices [B, T, k])
    token_divergence(student_logits [B, T, V], teacher, mask bool [B, T], divergence=..., beta, temperature)
        -> scalar: T² · mean over the N masked tokens of D(p_teacher^T, p_student^T)
    token_kd_loss(student_logits, teacher, labels int64 [B, T] (-100 ignored), mask, ...) -> (scalar, {'divergence', 'sft'})
    token_metrics(student_logits, teacher, mask) -> {'kl_sum', 'agree_sum', 'tokens'};  finish_token_metrics(*parts)
    TeacherCache(n, seq_len, vocab=V, top_k=k, directory=...).put(rows, targets) / .get(rows)

``p^T = softmax(logits / T)``; the teacher's targets are already at ``T`` (:func:`teacher_targets`). Divergences
(per token, summed over the vocabulary or over the top-k buckets):

==============  ===================================================================================================
``forward_kl``  KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s): mode-covering (Hinton et al. 2015)
``reverse_kl``  KL(p_s ‖ p_t): mode-seeking, the student need not cover every teacher mode (MiniLLM, Gu et al. 2024)
``jsd``         β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s (GKD's generalized JSD, Agarwal et al.
                2024, with TRL's ``GKDTrainer.generalized_jsd_loss`` convention); β = 0 and β = 1 are defined as
                forward and reverse KL (the formula itself vanishes there), β = 0.5 is the symmetric JSD
``tvd``         ½ Σ |p_t − p_s|, in [0, 1] before the T² factor (an f-divergence for LM KD in Wen et al. 2023)
==============  ===================================================================================================

All are multiplied by T² (Hinton et al. 2015: the soft-target gradients scale as 1/T², so the product keeps the
gradient scale, and the balance against the cross-entropy term, independent of T).

Top-k teachers. Keeping the full teacher distribution costs V numbers per token (V = 32k..150k); :class:`TopK`
keeps the k most likely tokens, and the divergence then compares the two distributions over k + 1 buckets: the
k teacher tokens, and one tail bucket holding every other token (teacher: 1 − Σ_k p_t; student: its mass outside
the k tokens, computed exactly as a log-sum-exp over those tokens, not as 1 − Σ_k p_s, which cancels when the
student is confident). Merging tokens into a bucket can only lower an f-divergence (data-processing inequality),
so the top-k divergence is a lower bound of the full one that grows with k and equals it at k = V.

Numerics: everything is computed in float32 on the masked tokens only (padding never reaches the arithmetic,
so it cannot inject NaN). Teacher log-probabilities are floored at :data:`LOG_FLOOR` (a -inf log-prob of a
one-hot teacher would otherwise make 0 · inf = NaN); the teacher's tail mass is clamped to at least
:data:`TAIL_FLOOR` and the k + 1 teacher buckets renormalised, because float16-stored log-probs round so that
Σ_k p_t can exceed 1 (a negative tail otherwise). The student's logits are expected finite (a model emitting
inf/NaN logits is a fault to surface, not to hide).

References:

* G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning Workshop
  2015 (arXiv:1503.02531): forward KL at temperature T, and the T² factor.
* R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem, "On-Policy Distillation of
  Language Models: Learning from Self-Generated Mistakes" (GKD), ICLR 2024 (arXiv:2306.13649): generalized JSD.
* Y. Gu, L. Dong, F. Wei, M. Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024
  (arXiv:2306.08543): reverse KL for generative LMs.
* Y. Wen, Z. Li, W. Du, L. Mou, "f-Divergence Minimization for Sequence-Level Knowledge Distillation", ACL 2023:
  total variation distance between next-token distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from engine.errors import InvalidSpec, ShapeMismatch
# TeacherCache and CACHE_DTYPES live in engine.lm.cache, TopK in engine.lm.topk; re-exported here for existing callers.
from engine.lm.cache import CACHE_DTYPES as CACHE_DTYPES, TeacherCache as TeacherCache
from engine.lm.topk import TopK as TopK

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")

#: Floor of teacher log-probabilities (and of the student's tail log-mass): finite, so 0 · (log p − log q) stays 0
#: for a token the teacher rules out, yet far below any log-prob a finite-logit model produces at useful scales.
LOG_FLOOR = -1.0e4

#: Least teacher tail mass of a :class:`TopK` (k < V). Float16-stored log-probs carry an error of up to
#: |log p|·2⁻¹¹ each, about 1e-4 on Σ_k p for a spread-out teacher, so a tail computed below that is rounding
#: noise; clamped at 0, it would cost the reverse KL / JSD a penalty log(p_s / 0) → 1e4 per unit of student tail
#: mass. 1e-6 keeps that penalty at the scale of ordinary log-ratios (≤ 14 nats) and moves the teacher by ≤ 1e-6.
TAIL_FLOOR = 1.0e-6


# ---- teacher targets ------------------------------------------------------------------------------------------------
def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidSpec(f"temperature must be a positive number, got {temperature!r}")


@torch.no_grad()
def teacher_targets(teacher_logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor | TopK:
    """[B, T, V] logits -> full log-probs [B, T, V] (top_k None or >= V) or TopK.

    The teacher's targets are constants of the distillation: computed without gradient, in float32.
    """
    _check_temperature(temperature)
    if top_k is not None and top_k < 1:
        raise InvalidSpec(f"top_k must be at least 1, got {top_k}")
    z = teacher_logits.float()
    if temperature != 1.0:
        z = z / temperature
    if top_k is None or top_k >= z.shape[-1]:
        return F.log_softmax(z, dim=-1)
    # log-softmax is monotone in the logits, so the top-k of z are the top-k log-probs: no [B, T, V] log-prob
    # tensor needed, only the normaliser.
    values, indices = z.topk(top_k, dim=-1)
    return TopK(values - torch.logsumexp(z, dim=-1, keepdim=True), indices)


# ---- the student's tail mass --------------------------------------------------------------------------------------
class _LogMassOutside(torch.autograd.Function):
    """log Σ_{j ∉ idx} exp(ls_j) per row of ls [N, V] (idx [N, k]), floored at LOG_FLOOR.

    Exact where 1 − Σ_k p_s would cancel (a student confident on the k tokens), with a gradient that never
    becomes inf/NaN. A custom function because autograd's logsumexp would keep its masked [N, V] input alive until
    backward; this keeps only ``ls``, which log-softmax saves anyway, and rebuilds the gradient from it.
    """

    @staticmethod
    def forward(ctx, ls: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.logsumexp(ls.scatter(-1, idx, float("-inf")), dim=-1).clamp_min(LOG_FLOOR)
        ctx.save_for_backward(ls, idx, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ls, idx, out = ctx.saved_tensors
        # d out / d ls_j = exp(ls_j − out) outside idx, 0 inside; scatter_ overwrites (not multiplies) the inside
        # entries, which may be inf when out sits at the floor.
        weights = torch.exp(ls - out.unsqueeze(-1)).scatter_(-1, idx, 0.0)
        return weights * grad.unsqueeze(-1), None


# ---- divergences ------------------------------------------------------------------------------------------------
def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last axis, from log-probs."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _per_token(lt: torch.Tensor, ls: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """[N] divergence between teacher and student log-probs [N, m] (m = V, or k + 1 buckets)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(lt, ls)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(ls, lt)
    if divergence == "jsd":
        # log m = log(β p_t + (1−β) p_s) in log space (logaddexp), as TRL does with logsumexp over a stack.
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


def _teacher_buckets(logprobs: torch.Tensor, tail: bool) -> torch.Tensor:
    """[N, k] top-k teacher log-probs -> [N, k + 1] log-probs of the k tokens and the tail (or [N, k] renormalised
    when the k tokens are the whole vocabulary), summing to 1."""
    lp = logprobs.float().clamp_min(LOG_FLOOR)
    if not tail:
        return F.log_softmax(lp, dim=-1)
    lse = torch.logsumexp(lp, dim=-1)
    # 1 − Σ_k p = −expm1(log Σ_k p): accurate when the tail is small; clamped (negative after float16 rounding).
    log_tail = torch.log((-torch.expm1(lse)).clamp_min(TAIL_FLOOR))
    buckets = torch.cat([lp, log_tail.unsqueeze(-1)], dim=-1)
    return buckets - torch.logaddexp(lse, log_tail).unsqueeze(-1)


def _student_logprobs(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = student_logits.float()
    return F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [N, ...] rows where mask [B, T] is True (a view when every token counts)."""
    return x.flatten(0, 1) if bool(mask.all()) else x[mask]


def _check_mask(student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if student_logits.dim() != 3:
        raise ShapeMismatch(f"student logits must be [batch, positions, vocab], got {tuple(student_logits.shape)}")
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ShapeMismatch(f"mask {tuple(mask.shape)} does not match the student's logits {tuple(student_logits.shape)}")
    return mask.to(device=student_logits.device, dtype=torch.bool)


def _pair(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor,
          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probs [N, m] over the same outcomes: the vocabulary, or the top-k buckets."""
    vocab = student_logits.shape[-1]
    if isinstance(teacher, TopK):
        if teacher.logprobs.shape != teacher.indices.shape or tuple(teacher.logprobs.shape[:2]) != tuple(mask.shape):
            raise ShapeMismatch(f"top-k teacher {tuple(teacher.logprobs.shape)} / {tuple(teacher.indices.shape)} does "
                                f"not match the student's logits {tuple(student_logits.shape)}")
        teacher = teacher.to(student_logits.device)
        idx = _select(teacher.indices, mask).long()
        tail = idx.shape[-1] < vocab
        lt = _teacher_buckets(_select(teacher.logprobs, mask), tail)
        ls_full = _student_logprobs(_select(student_logits, mask), temperature)
        ls = ls_full.gather(-1, idx)
        if tail:
            ls = torch.cat([ls, _LogMassOutside.apply(ls_full, idx).unsqueeze(-1)], dim=-1)
        return lt, ls
    if tuple(teacher.shape) != tuple(student_logits.shape):
        raise ShapeMismatch(f"teacher {tuple(teacher.shape)} and student {tuple(student_logits.shape)} logits differ "
                            f"(different vocabularies need a shared tokenizer)")
    # Renormalised: float16-stored log-probs no longer sum to exactly 1 (log-softmax of log-probs is the identity).
    lt = F.log_softmax(_select(teacher.to(student_logits.device), mask).float(), dim=-1).clamp_min(LOG_FLOOR)
    return lt, _student_logprobs(_select(student_logits, mask), temperature)


def _zero(student_logits: torch.Tensor) -> torch.Tensor:
    """0 still attached to the student's graph (so ``backward`` works on a batch without any counted token)."""
    return student_logits[..., :0].float().sum()


def token_divergence(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor, *, divergence: str,
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens where mask [B, T] (bool) is True of the per-token divergence between the teacher's
    and the student's next-token distributions at temperature T, multiplied by T**2 (Hinton et al. 2015, so the
    gradient scale does not depend on T). divergence: 'forward_kl' = KL(teacher || student),
    'reverse_kl' = KL(student || teacher), 'jsd' = generalized JSD with beta as in GKD (Agarwal et al. 2024,
    "On-Policy Distillation of Language Models"; same convention as TRL's GKDTrainer.generalized_jsd_loss:
    beta=0 -> forward KL, beta=1 -> reverse KL, else beta*KL(teacher||M) + (1-beta)*KL(student||M) with
    M = beta*teacher + (1-beta)*student), 'tvd' = total variation 0.5*sum|p - q|.

    ``teacher`` is :func:`teacher_targets`'s output at the same T (log-probs [B, T, V] or :class:`TopK`).
    With a TopK teacher, both distributions are compared over k+1 buckets: the k teacher tokens and one
    'tail' bucket holding the rest of the mass (student: 1 - sum of its probabilities on the k tokens),
    computed stably in log space, never NaN/inf even when the tail mass is 0 or the student puts all its mass
    on the k tokens. A batch without any masked token gives 0.
    """
    if divergence not in DIVERGENCES:
        raise InvalidSpec(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise InvalidSpec(f"beta must lie in [0, 1], got {beta!r}")
    _check_temperature(temperature)
    mask = _check_mask(student_logits, mask)
    if not bool(mask.any()):
        return _zero(student_logits)
    lt, ls = _pair(student_logits, teacher, mask, temperature)
    return _per_token(lt, ls, divergence, beta).mean() * (temperature * temperature)


def token_kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor, mask: torch.Tensor,
                  *, divergence: str, beta: float, temperature: float, sft_weight: float
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - sft_weight) * token_divergence(...) + sft_weight * cross_entropy(student_logits, labels)
    (labels [B, T] int64, -100 = ignored; the next-token targets already shifted by the caller so position t
    predicts labels[:, t]). Returns the loss and its parts as floats {'divergence': ..., 'sft': ...}.

    The cross-entropy is at T = 1 (the data's tokens are hard targets) and averaged over the non-ignored labels.
    A part whose weight is 0 is still computed for the report, without gradient.
    """
    if not 0.0 <= sft_weight <= 1.0:
        raise InvalidSpec(f"sft_weight must lie in [0, 1], got {sft_weight!r}")
    if tuple(labels.shape) != tuple(student_logits.shape[:2]):
        raise ShapeMismatch(f"labels {tuple(labels.shape)} do not match the student's logits {tuple(student_logits.shape)}")
    with torch.set_grad_enabled(torch.is_grad_enabled() and sft_weight < 1.0):
        div = token_divergence(student_logits, teacher, mask, divergence=divergence, beta=beta, temperature=temperature)
    with torch.set_grad_enabled(torch.is_grad_enabled() and sft_weight > 0.0):
        labels = labels.to(student_logits.device, torch.int64)
        counted = labels != -100
        # Only the labelled positions: cross-entropy over all B·T positions would build a [B·T, V] float32 copy.
        sft = (F.cross_entropy(_select(student_logits, counted).float(), labels[counted]) if bool(counted.any())
               else _zero(student_logits))
    if sft_weight == 0.0:
        loss = div
    elif sft_weight == 1.0:
        loss = sft
    else:
        loss = (1.0 - sft_weight) * div + sft_weight * sft
    return loss, {"divergence": float(div.detach()), "sft": float(sft.detach())}


# ---- report metrics ----------------------------------------------------------------------------------------------
@torch.no_grad()
def token_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopK, mask: torch.Tensor
                  ) -> dict[str, float]:
    """Sums over the tokens where mask is True, for the report: {'kl_sum': Σ KL(teacher || student) at T = 1,
    'agree_sum': how many tokens the two argmax tokens agree on (top-1 agreement), 'tokens': how many tokens}.

    Sums add up over batches (:func:`finish_token_metrics` turns them into means). ``teacher_logits``: logits or
    log-probs [B, T, V] (normalised here), or a :class:`TopK` at T = 1 (then the KL is over the k + 1 buckets,
    a lower bound of the full KL, and the teacher's argmax is its most likely kept token).
    """
    mask = _check_mask(student_logits, mask)
    tokens = int(mask.sum())
    if tokens == 0:
        return {"kl_sum": 0.0, "agree_sum": 0.0, "tokens": 0.0}
    lt, ls = _pair(student_logits, teacher_logits, mask, 1.0)
    if isinstance(teacher_logits, TopK):
        top = teacher_logits.to(student_logits.device)
        best = _select(top.logprobs, mask).argmax(-1, keepdim=True)
        teacher_top = _select(top.indices, mask).long().gather(-1, best)[:, 0]
        student_top = _select(student_logits, mask).argmax(-1)
    else:
        teacher_top, student_top = lt.argmax(-1), ls.argmax(-1)
    return {"kl_sum": float(_kl(lt, ls).sum()), "agree_sum": float((teacher_top == student_top).sum()),
            "tokens": float(tokens)}


def finish_token_metrics(*parts: Mapping[str, float]) -> dict[str, float]:
    """{'kl': mean per-token KL(teacher || student), 'agreement': share of tokens whose argmax agree, 'tokens'}
    from one or more :func:`token_metrics` results (NaN means when no token was counted)."""
    total = {key: sum(float(p[key]) for p in parts) for key in ("kl_sum", "agree_sum", "tokens")}
    n = total["tokens"]
    return {"kl": total["kl_sum"] / n if n else math.nan, "agreement": total["agree_sum"] / n if n else math.nan,
            "tokens": n}
