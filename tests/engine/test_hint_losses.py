"""Hint losses: numpy golden values, adapters, attention transfer, and that the adapter learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.losses.hints import HintLoss
from engine.errors import EngineError

RNG = np.random.default_rng(0)
SV = RNG.normal(size=(4, 6))  # vectors
TV = RNG.normal(size=(4, 6))
SM = RNG.normal(size=(2, 3, 4, 4))  # maps
TM = RNG.normal(size=(2, 3, 4, 4))


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def np_cos_dist(s, t):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    cos = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    return (1 - cos).mean()


def np_at(f):
    a = (f**2).sum(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_pool2(a):  # [B, C, 4, 4] -> [B, C, 2, 2] average
    return a.reshape(a.shape[0], a.shape[1], 2, 2, 2, 2).mean(axis=(3, 5))


@pytest.mark.parametrize("s,t", [(SV, TV), (SM, TM)])
def test_same_shape_mse_and_cosine_are_plain(s, t):
    shape = s.shape[1:]
    mse = HintLoss("mse", shape, shape).double()
    cos = HintLoss("cosine", shape, shape).double()
    assert list(mse.parameters()) == []
    assert float(mse(_t(s), _t(t))) == pytest.approx(((s - t) ** 2).mean(), rel=1e-12)
    assert float(cos(_t(s), _t(t))) == pytest.approx(np_cos_dist(s, t), rel=1e-12)


def test_golden_constants():
    s = np.array([[1.0, 2.0], [0.0, 1.0]])
    t = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert float(HintLoss("mse", (2,), (2,))(_t(s), _t(t))) == pytest.approx((4 + 4) / 4, rel=1e-12)
    # row 0: cos = 1/sqrt5, row 1: cos = 1
    assert float(HintLoss("cosine", (2,), (2,))(_t(s), _t(t))) == pytest.approx((1 - 1 / np.sqrt(5)) / 2, rel=1e-12)
    # attention on vectors: q = f^2/||f^2||; row 0: [1,4]/sqrt17 vs [1,0]; row 1: [0,1] vs [0,1]
    q = np.array([1.0, 4.0]) / np.sqrt(17.0)
    want = (((q - np.array([1.0, 0.0])) ** 2).sum()) / 4
    assert float(HintLoss("attention", (2,), (2,))(_t(s), _t(t))) == pytest.approx(want, rel=1e-12)


def test_linear_adapter_golden():
    hint = HintLoss("mse", (6,), (3,)).double()
    w = RNG.normal(size=(6, 3))
    b = RNG.normal(size=6)
    with torch.no_grad():
        hint.adapter.weight.copy_(_t(w))
        hint.adapter.bias.copy_(_t(b))
    s = SV[:, :3]
    assert hint(_t(s), _t(TV)).detach().item() == pytest.approx(((s @ w.T + b - TV) ** 2).mean(), rel=1e-12)
    hint = HintLoss("cosine", (6,), (3,)).double()
    with torch.no_grad():
        hint.adapter.weight.copy_(_t(w))
        hint.adapter.bias.copy_(_t(b))
    assert hint(_t(s), _t(TV)).detach().item() == pytest.approx(np_cos_dist(s @ w.T + b, TV), rel=1e-12)


def test_conv_adapter_and_pooling_golden():
    s = RNG.normal(size=(2, 2, 4, 4))
    t = RNG.normal(size=(2, 3, 2, 2))
    hint = HintLoss("mse", (3, 2, 2), (2, 4, 4)).double()
    assert isinstance(hint.adapter, torch.nn.Conv2d) and hint.adapter.kernel_size == (1, 1)
    w = RNG.normal(size=(3, 2))
    b = RNG.normal(size=3)
    with torch.no_grad():
        hint.adapter.weight.copy_(_t(w).reshape(3, 2, 1, 1))
        hint.adapter.bias.copy_(_t(b))
    adapted = np.einsum("oc,bchw->bohw", w, s) + b[None, :, None, None]
    want = ((np_pool2(adapted) - t) ** 2).mean()
    assert hint(_t(s), _t(t)).detach().item() == pytest.approx(want, rel=1e-12)


def test_attention_transfer_golden():
    hint = HintLoss("attention", (5, 4, 4), (3, 4, 4))
    assert list(hint.parameters()) == []  # no adapter: channel counts may differ freely
    t5 = RNG.normal(size=(2, 5, 4, 4))
    want = ((np_at(SM) - np_at(t5)) ** 2).mean()
    assert hint(_t(SM), _t(t5)).detach().item() == pytest.approx(want, rel=1e-12)
    # different spatial sizes: the maps are pooled to the smaller 2x2 before normalising
    t_small = RNG.normal(size=(2, 5, 2, 2))
    a_s = np_pool2((SM**2).sum(axis=1)[:, None])[:, 0].reshape(2, -1)
    a_t = (t_small**2).sum(axis=1).reshape(2, -1)
    q_s = a_s / np.linalg.norm(a_s, axis=1, keepdims=True)
    q_t = a_t / np.linalg.norm(a_t, axis=1, keepdims=True)
    got = float(HintLoss("attention", (5, 2, 2), (3, 4, 4))(_t(SM), _t(t_small)))
    assert got == pytest.approx(((q_s - q_t) ** 2).mean(), rel=1e-12)
    assert float(hint(_t(SM), _t(np.concatenate([2 * SM, np.zeros((2, 2, 4, 4))], axis=1)))) == pytest.approx(0.0, abs=1e-12)


def test_token_and_mixed_rank_features():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 10, 16)
    hint = HintLoss("mse", (10, 16), (5, 8))
    assert isinstance(hint.adapter, torch.nn.Linear) and hint.adapter.in_features == 8
    assert torch.isfinite(hint(s, t))
    mixed = HintLoss("cosine", (3, 4, 4), (12,))
    assert mixed.adapter.in_features == 12 and mixed.adapter.out_features == 48
    assert torch.isfinite(mixed(torch.randn(2, 12), torch.randn(2, 3, 4, 4)))
    assert torch.isfinite(HintLoss("attention", (3, 4, 4), (12,))(torch.randn(2, 12), torch.randn(2, 3, 4, 4)))


def test_errors():
    with pytest.raises(EngineError) as e:
        HintLoss("l1", (2,), (2,))
    assert e.value.code == "invalid_spec"
    with pytest.raises(EngineError) as e:
        HintLoss("mse", (2,), (2,))(torch.zeros(1, 3), torch.zeros(1, 2))
    assert e.value.code == "shape_mismatch"


@pytest.mark.parametrize("distance,t_shape,s_shape", [("mse", (16,), (6,)), ("cosine", (16,), (6,)),
                                                       ("mse", (8, 4, 4), (3, 4, 4))])
def test_adapter_learns(distance, t_shape, s_shape):
    torch.manual_seed(0)
    s = torch.randn(64, *s_shape)
    if len(s_shape) == 1:
        t = s @ torch.randn(s_shape[0], t_shape[0]) + 0.5
    else:
        t = torch.einsum("bchw,co->bohw", s, torch.randn(s_shape[0], t_shape[0]))
    hint = HintLoss(distance, t_shape, s_shape)
    opt = torch.optim.Adam(hint.parameters(), lr=0.05)
    first = hint(s, t).detach().item()
    for _ in range(200):
        loss = hint(s, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert hint(s, t).detach().item() < 0.05 * first


def test_gradient_reaches_the_student_not_the_teacher():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 8, requires_grad=True)
    HintLoss("mse", (8,), (4,))(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
