"""Token-level KD divergences (engine/lm/divergence.py, cache.py): golden values, identities, top-k buckets, numerics, cache.

Reference values are computed independently here, with math/numpy in float64, from the same distributions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import InvalidSpec, ShapeMismatch
from engine.lm.divergence import (
    DIVERGENCES,
    LOG_FLOOR,
    TAIL_FLOOR,
    TeacherCache,
    TopK,
    _LogMassOutside,
    finish_token_metrics,
    teacher_targets,
    token_divergence,
    token_kd_loss,
    token_metrics,
)


def _kl(p, q):
    return float(sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0))


def _np_div(p: np.ndarray, q: np.ndarray, divergence: str, beta: float = 0.5) -> float:
    """Divergence between two probability vectors (float64), the module's conventions."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(p, q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return 0.5 * float(np.abs(p - q).sum())


def _random(b=2, t=5, v=11, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g) * scale, torch.randn(b, t, v, generator=g) * scale


def _ones(logits):
    return torch.ones(logits.shape[:2], dtype=torch.bool)


# ---- golden values ---------------------------------------------------------------------------------------------------
P, Q = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]


def _golden_inputs():
    teacher = torch.tensor([[P]]).log()  # [1, 1, 3] log-probs
    student = torch.tensor([[Q]]).log() + 3.0  # logits: a shift does not change the softmax
    return student, teacher, torch.ones(1, 1, dtype=torch.bool)


@pytest.mark.parametrize("divergence,expected", [
    ("forward_kl", 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)),
    ("reverse_kl", 0.5 * math.log(0.5 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.1)),
    ("tvd", 0.5 * (0.2 + 0.1 + 0.1)),
])
def test_golden_values_on_three_tokens(divergence, expected):
    student, teacher, mask = _golden_inputs()
    got = token_divergence(student, teacher, mask, divergence=divergence)
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.3, 0.9])
def test_golden_generalized_jsd(beta):
    student, teacher, mask = _golden_inputs()
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    expected = beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
    got = token_divergence(student, teacher, mask, divergence="jsd", beta=beta)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    if beta == 0.5:  # the symmetric JSD is at most log 2
        assert 0 < got.item() < math.log(2)


def test_forward_kl_matches_torch_kl_div():
    s, t = _random()
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    got = token_divergence(s, teacher_targets(t, 1.0, None), _ones(s), divergence="forward_kl")
    assert torch.allclose(got, ref, atol=1e-6)


def test_jsd_endpoints_are_the_two_kls_and_half_is_symmetric():
    s, t = _random(seed=1)
    mask = _ones(s)
    lt = teacher_targets(t, 1.0, None)
    fwd = token_divergence(s, lt, mask, divergence="forward_kl")
    rev = token_divergence(s, lt, mask, divergence="reverse_kl")
    assert torch.allclose(token_divergence(s, lt, mask, divergence="jsd", beta=0.0), fwd, atol=1e-7)
    assert torch.allclose(token_divergence(s, lt, mask, divergence="jsd", beta=1.0), rev, atol=1e-7)
    # KL is not symmetric, JSD(0.5) is: swap the roles of teacher and student
    swapped = dict(student_logits=t, teacher=teacher_targets(s, 1.0, None), mask=mask)
    assert not torch.allclose(token_divergence(**swapped, divergence="forward_kl"), fwd, atol=1e-3)
    assert torch.allclose(token_divergence(**swapped, divergence="jsd", beta=0.5),
                          token_divergence(s, lt, mask, divergence="jsd", beta=0.5), atol=1e-6)


def test_tvd_is_bounded():
    s, t = _random(seed=2, scale=6.0)
    tvd = token_divergence(s, teacher_targets(t, 1.0, None), _ones(s), divergence="tvd")
    assert 0.0 < tvd.item() <= 1.0
    same = token_divergence(t, teacher_targets(t, 1.0, None), _ones(t), divergence="tvd")
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # disjoint (saturated) distributions: TVD -> 1, never above
    a = torch.tensor([[[50.0, -50.0]]])
    disjoint = token_divergence(a, teacher_targets(-a, 1.0, None), _ones(a), divergence="tvd")
    assert disjoint.item() == pytest.approx(1.0, abs=1e-6) and disjoint.item() <= 1.0 + 1e-6


def test_all_divergences_match_numpy_on_random_distributions():
    s, t = _random(b=1, t=3, v=7, seed=3)
    mask = _ones(s)
    p = torch.softmax(t.double(), -1).numpy()[0]
    q = torch.softmax(s.double(), -1).numpy()[0]
    for divergence in DIVERGENCES:
        for beta in (0.0, 0.25, 1.0):
            expected = np.mean([_np_div(p[i], q[i], divergence, beta) for i in range(3)])
            got = token_divergence(s, teacher_targets(t, 1.0, None), mask, divergence=divergence, beta=beta)
            assert got.item() == pytest.approx(expected, abs=1e-5), (divergence, beta)


# ---- temperature and masks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_softens_both_and_scales_by_t_squared(divergence):
    s, t = _random(b=1, t=4, v=9, seed=4)
    temp = 3.0
    p = torch.softmax(t.double() / temp, -1).numpy()[0]
    q = torch.softmax(s.double() / temp, -1).numpy()[0]
    expected = temp ** 2 * np.mean([_np_div(p[i], q[i], divergence, 0.3) for i in range(4)])
    got = token_divergence(s, teacher_targets(t, temp, None), _ones(s), divergence=divergence, beta=0.3,
                           temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_mask_excludes_tokens_even_when_they_hold_nan():
    s, t = _random(b=2, t=4, v=6, seed=5)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    poisoned = s.clone()
    poisoned[~mask] = float("nan")
    poisoned.requires_grad_(True)
    lt = teacher_targets(t, 1.0, None)
    for divergence in DIVERGENCES:
        got = token_divergence(poisoned, lt, mask, divergence=divergence)
        kept = token_divergence(s[mask][None], lt[mask][None], torch.ones(1, 4, dtype=torch.bool), divergence=divergence)
        assert torch.allclose(got, kept, atol=1e-6), divergence
        (grad,) = torch.autograd.grad(got, poisoned)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    top = teacher_targets(t, 1.0, 3)
    got = token_divergence(poisoned, top, mask, divergence="forward_kl")
    assert torch.isfinite(got)


def test_no_counted_token_gives_a_zero_that_backpropagates():
    s, t = _random(seed=6)
    s.requires_grad_(True)
    loss = token_divergence(s, teacher_targets(t, 1.0, None), torch.zeros(2, 5, dtype=torch.bool), divergence="jsd")
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


# ---- top-k teachers --------------------------------------------------------------------------------------------------
def test_teacher_targets_shapes_and_normalisation():
    _, t = _random(v=11)
    full = teacher_targets(t, 2.0, None)
    assert isinstance(full, torch.Tensor) and full.dtype == torch.float32
    assert torch.allclose(full.exp().sum(-1), torch.ones(2, 5), atol=1e-6)
    assert isinstance(teacher_targets(t, 2.0, 11), torch.Tensor) and isinstance(teacher_targets(t, 2.0, 50), torch.Tensor)
    top = teacher_targets(t, 2.0, 4)
    assert isinstance(top, TopK) and top.logprobs.shape == (2, 5, 4) and top.indices.dtype == torch.int64
    assert torch.allclose(top.logprobs, full.gather(-1, top.indices), atol=1e-6)
    assert torch.equal(top.indices, full.topk(4, -1).indices)
    assert torch.allclose(top.tail_mass(), 1 - full.topk(4, -1).values.exp().sum(-1), atol=1e-6)
    with pytest.raises(InvalidSpec):
        teacher_targets(t, 0.0, None)
    with pytest.raises(InvalidSpec):
        teacher_targets(t, 1.0, 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_with_k_equal_vocab_is_the_full_computation(divergence):
    s, t = _random(seed=7)
    full = teacher_targets(t, 1.5, None)
    values, indices = full.topk(full.shape[-1], dim=-1)  # every token, in another order
    kw = dict(divergence=divergence, beta=0.3, temperature=1.5)
    assert torch.allclose(token_divergence(s, TopK(values, indices), _ones(s), **kw),
                          token_divergence(s, full, _ones(s), **kw), atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_is_exact_over_the_k_tokens_plus_tail_and_grows_to_the_full_value(divergence):
    s, t = _random(b=1, t=3, v=12, seed=8, scale=1.5)
    mask = _ones(s)
    p = torch.softmax(t.double(), -1).numpy()[0]
    q = torch.softmax(s.double(), -1).numpy()[0]
    values = []
    for k in range(1, 13):
        top = teacher_targets(t, 1.0, k)
        got = token_divergence(s, top, mask, divergence=divergence, beta=0.4).item()
        if k < 12:  # independent reference: k + 1 buckets
            idx = top.indices.numpy()[0]
            expected = []
            for i in range(3):
                pb = np.append(p[i][idx[i]], 1 - p[i][idx[i]].sum())
                qb = np.append(q[i][idx[i]], 1 - q[i][idx[i]].sum())
                assert pb[-1] > TAIL_FLOOR
                expected.append(_np_div(pb, qb, divergence, 0.4))
            assert got == pytest.approx(np.mean(expected), abs=2e-6), k
        values.append(got)
    full = token_divergence(s, teacher_targets(t, 1.0, None), mask, divergence=divergence, beta=0.4).item()
    # merging tokens never increases an f-divergence: a lower bound, growing with k, exact at k = V
    assert all(a <= b + 1e-5 for a, b in zip(values, values[1:]))  # float32 rounding: k = V - 1 is already exact
    assert values[-1] == pytest.approx(full, abs=1e-6) and values[0] < full


def test_log_mass_outside_gradient():
    g = torch.Generator().manual_seed(9)
    ls = F.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    idx = torch.tensor([[0, 3], [6, 1], [2, 2], [5, 4]])
    ref = torch.logsumexp(ls.detach().scatter(-1, idx, float("-inf")), -1)
    assert torch.allclose(_LogMassOutside.apply(ls, idx), ref)
    assert torch.autograd.gradcheck(lambda x: _LogMassOutside.apply(x, idx), (ls,))


# ---- numerics in extreme cases ---------------------------------------------------------------------------------------
def _grads_finite(student: torch.Tensor, teacher, **kw) -> None:
    student = student.clone().requires_grad_(True)
    mask = _ones(student)
    for divergence in DIVERGENCES:
        for beta in (0.0, 0.5, 1.0):
            loss = token_divergence(student, teacher, mask, divergence=divergence, beta=beta, **kw)
            (grad,) = torch.autograd.grad(loss, student)
            assert torch.isfinite(loss), (divergence, beta)
            assert torch.isfinite(grad).all(), (divergence, beta)


def test_gradients_finite_for_one_hot_teacher_and_saturated_student():
    v = 8
    saturated = torch.full((1, 2, v), -1e4)
    saturated[0, 0, 0] = saturated[0, 1, 5] = 1e4
    one_hot_logprobs = torch.full((1, 2, v), float("-inf"))
    one_hot_logprobs[0, :, 0] = 0.0
    one_hot_logits = torch.full((1, 2, v), -1e4)
    one_hot_logits[0, :, 0] = 1e4
    for student in (saturated, torch.zeros(1, 2, v)):
        _grads_finite(student, one_hot_logprobs)
        _grads_finite(student, teacher_targets(one_hot_logits, 1.0, None), temperature=0.5)
        _grads_finite(student, teacher_targets(one_hot_logits, 1.0, 3))
        _grads_finite(student, TopK(one_hot_logprobs[..., :3], torch.arange(3).expand(1, 2, 3)))


def test_zero_tail_and_student_all_mass_on_the_k_tokens():
    # teacher: all its mass on tokens 0 and 1 (tail exactly 0); student: saturated on the same two
    teacher = TopK(torch.full((1, 1, 2), math.log(0.5)), torch.tensor([[[0, 1]]]))
    for saturation in (1e4, 20.0):
        student = torch.tensor([[[saturation] * 2 + [-saturation] * 3]])
        _grads_finite(student, teacher)
        loss = token_divergence(student, teacher, _ones(student), divergence="forward_kl")
        # the teacher's tail is floored at TAIL_FLOOR, the student's log tail at LOG_FLOOR: at most 1e-6 · 1e4
        assert 0.0 <= loss.item() <= TAIL_FLOOR * -LOG_FLOOR + 1e-6
        if saturation == 20.0:  # student tail 1.5·e⁻⁴⁰: KL ≈ 1e-6 · (log 1e-6 − log 1.5e-40 − 1), the −1 from
            # renormalising the teacher's two tokens by 1 + 1e-6
            assert loss.item() == pytest.approx(TAIL_FLOOR * (math.log(TAIL_FLOOR) - math.log(1.5) + 40 - 1), rel=1e-3)
    # moderate saturation: 1 − Σ_k q rounds to 0 in float32, the log-sum-exp tail does not
    student = torch.tensor([[[20.0, 20.0, -20.0, -20.0, -20.0]]], requires_grad=True)
    loss = token_divergence(student, TopK(torch.tensor([[[math.log(0.45)] * 2]]), teacher.indices), _ones(student),
                            divergence="forward_kl")
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[0, 0, 2:] < 0).all()  # pushed towards the tail


def test_float16_stored_logprobs_keep_a_nonnegative_tail_and_finite_gradients(tmp_path):
    # a confident teacher: float16 rounding of the log-probs makes Σ_k p exceed 1
    lp = torch.tensor([[[-1e-4, -9.5, -10.0]]]).log_softmax(-1)
    logits = torch.cat([lp, torch.full((1, 1, 5), -30.0)], -1)
    top = teacher_targets(logits, 1.0, 3)
    cache = TeacherCache(1, 1, vocab=8, top_k=3, directory=tmp_path)
    cache.put(torch.tensor([0]), TopK(top.logprobs + 2e-4, top.indices))  # pushed over 1, as rounding can
    stored = cache.get(torch.tensor([0]))
    assert float(stored.logprobs.exp().sum()) > 1.0
    assert (stored.tail_mass() >= 0).all()
    _grads_finite(torch.randn(1, 1, 8), stored)
    _grads_finite(torch.randn(1, 1, 8), stored, temperature=2.0)


# ---- the combined loss -----------------------------------------------------------------------------------------------
def test_sft_weight_one_is_cross_entropy_with_ignored_labels():
    s, t = _random(seed=10)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    mask = labels != -100
    kw = dict(divergence="forward_kl", beta=0.5, temperature=2.0)
    loss, parts = token_kd_loss(s, teacher_targets(t, 2.0, None), labels, mask, sft_weight=1.0, **kw)
    ce = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ce, atol=1e-6) and parts["sft"] == pytest.approx(ce.item(), abs=1e-6)
    div = token_divergence(s, teacher_targets(t, 2.0, None), mask, **kw)
    assert parts["divergence"] == pytest.approx(div.item(), abs=1e-6)
    mixed, _ = token_kd_loss(s, teacher_targets(t, 2.0, None), labels, mask, sft_weight=0.25, **kw)
    assert torch.allclose(mixed, 0.75 * div + 0.25 * ce, atol=1e-6)
    only_kd, _ = token_kd_loss(s, teacher_targets(t, 2.0, None), labels, mask, sft_weight=0.0, **kw)
    assert torch.allclose(only_kd, div, atol=1e-7)


def test_zero_weight_part_carries_no_gradient():
    s, t = _random(seed=11)
    s.requires_grad_(True)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    loss, _ = token_kd_loss(s, teacher_targets(t, 1.0, 4), labels, _ones(s), divergence="reverse_kl", beta=0.5,
                            temperature=1.0, sft_weight=1.0)
    (grad,) = torch.autograd.grad(loss, s)
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1)), s)
    assert torch.allclose(grad, ce_grad, atol=1e-7)


def test_invalid_arguments():
    s, t = _random()
    lt = teacher_targets(t, 1.0, None)
    with pytest.raises(InvalidSpec):
        token_divergence(s, lt, _ones(s), divergence="kl")
    with pytest.raises(InvalidSpec):
        token_divergence(s, lt, _ones(s), divergence="jsd", beta=1.5)
    with pytest.raises(ShapeMismatch):
        token_divergence(s[..., :10], lt, _ones(s), divergence="tvd")
    with pytest.raises(ShapeMismatch):
        token_divergence(s, lt, torch.ones(2, 4, dtype=torch.bool), divergence="tvd")
    with pytest.raises(InvalidSpec):
        token_kd_loss(s, lt, torch.zeros(2, 5, dtype=torch.long), _ones(s), divergence="tvd", beta=0.5,
                      temperature=1.0, sft_weight=2.0)


# ---- report metrics --------------------------------------------------------------------------------------------------
def test_token_metrics_on_a_hand_example():
    teacher = torch.tensor([[P, [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]).log()
    student = torch.tensor([[Q, [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]]]).log()
    mask = torch.tensor([[True, True, False]])
    m = token_metrics(student, teacher, mask)
    kl = _kl(P, Q) + _kl([0.1, 0.1, 0.8], [0.6, 0.2, 0.2])
    assert m["tokens"] == 2 and m["agree_sum"] == 1 and m["kl_sum"] == pytest.approx(kl, abs=1e-6)
    done = finish_token_metrics(m)
    assert done["agreement"] == 0.5 and done["kl"] == pytest.approx(kl / 2, abs=1e-6)
    # sums aggregate over batches: the masked-out third token counted in a second batch
    third = token_metrics(student, teacher, ~mask)
    both = finish_token_metrics(m, third)
    assert both["tokens"] == 3 and both["agreement"] == pytest.approx(2 / 3)
    assert both["kl"] == pytest.approx((kl + _kl([0.3, 0.3, 0.4], [0.1, 0.1, 0.8])) / 3, abs=1e-6)
    # a top-k teacher: same agreement (argmax kept), KL over the buckets (a lower bound)
    top = token_metrics(student, teacher_targets(teacher, 1.0, 1), mask)
    assert top["agree_sum"] == 1 and 0 < top["kl_sum"] <= m["kl_sum"]
    assert math.isnan(finish_token_metrics(token_metrics(student, teacher, torch.zeros(1, 3, dtype=torch.bool)))["kl"])


# ---- the cache -------------------------------------------------------------------------------------------------------
def _batches(n=6, seq=4, v=10, k=3):
    _, t = _random(b=n, t=seq, v=v, seed=12, scale=3.0)
    return t, teacher_targets(t, 1.0, k), teacher_targets(t, 1.0, None)


@pytest.mark.parametrize("limit", [256 << 20, 0])
def test_top_k_cache_round_trip(tmp_path, limit):
    _, top, _ = _batches()
    cache = TeacherCache(6, 4, vocab=10, top_k=3, directory=tmp_path, memory_limit_bytes=limit, logprob_dtype="float32")
    assert cache.on_disk == (limit == 0)
    assert cache.nbytes == TeacherCache.estimate_bytes(6, 4, vocab=10, top_k=3, logprob_dtype="float32") == 6 * 4 * 3 * 8
    rows = torch.tensor([4, 0, 2])
    cache.put(rows, TopK(top.logprobs[rows], top.indices[rows]))
    cache.put(torch.tensor([1, 3, 5]), TopK(top.logprobs[[1, 3, 5]], top.indices[[1, 3, 5]]))
    assert cache.complete
    got = cache.get(torch.tensor([5, 2, 0]))
    assert got.logprobs.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert torch.equal(got.logprobs, top.logprobs[[5, 2, 0]]) and torch.equal(got.indices, top.indices[[5, 2, 0]])
    if limit == 0:
        files = sorted(p.name for p in tmp_path.rglob("*.npy"))
        assert files == ["indices.npy", "logprobs.npy"]
    cache.close()
    assert not list(tmp_path.rglob("*.npy"))


@pytest.mark.parametrize("limit", [256 << 20, 0])
def test_float16_caches_round_trip(tmp_path, limit):
    _, top, full = _batches()
    rows = torch.arange(6)
    with TeacherCache(6, 4, vocab=10, top_k=3, directory=tmp_path, memory_limit_bytes=limit) as cache:
        assert cache.nbytes == 6 * 4 * 3 * 6 and cache.on_disk == (limit == 0)
        cache.put(rows, top)
        got = cache.get(rows)
        assert torch.equal(got.indices, top.indices)
        assert torch.allclose(got.logprobs, top.logprobs, rtol=1e-3, atol=1e-4)
    with TeacherCache(6, 4, vocab=10, top_k=None, directory=tmp_path, memory_limit_bytes=limit) as cache:
        assert cache.nbytes == 6 * 4 * 10 * 2
        cache.put(rows, full)
        got = cache.get(rows[:2])
        assert got.dtype == torch.float32 and torch.allclose(got, full[:2], rtol=1e-3, atol=1e-4)
        s = torch.randn(2, 4, 10)
        # float16 storage moves the divergence very little
        for divergence in DIVERGENCES:
            a = token_divergence(s, got, _ones(s), divergence=divergence)
            b = token_divergence(s, full[:2], _ones(s), divergence=divergence)
            assert a.item() == pytest.approx(b.item(), rel=2e-3, abs=1e-4)
    assert not list(tmp_path.rglob("*.npy"))


def test_cache_refuses_what_does_not_fit(tmp_path):
    _, top, full = _batches()
    cache = TeacherCache(6, 4, vocab=10, top_k=3, directory=tmp_path)
    with pytest.raises(ShapeMismatch):
        cache.put(torch.tensor([0]), full[:1])
    with pytest.raises(ShapeMismatch):
        cache.put(torch.tensor([0, 1]), TopK(top.logprobs[:1], top.indices[:1]))
    with pytest.raises(ShapeMismatch):
        cache.put(torch.tensor([0]), TopK(top.logprobs[:1], top.indices[:1] + 10))
    with pytest.raises(KeyError):
        cache.get(torch.tensor([0]))
    assert not cache.complete
    assert TeacherCache(6, 4, vocab=10, top_k=10, directory=tmp_path).top_k is None  # k >= V keeps everything
