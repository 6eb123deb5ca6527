"""Golden values for the kd loss, computed independently in numpy from the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.registry import losses
import engine.losses.outputs  # noqa: F401  (registers "kd")

S = np.array([[1.0, 2.0, 0.5], [0.3, -1.2, 2.2], [0.0, 0.0, 0.0]])
T = np.array([[2.0, 1.0, 0.1], [0.0, 0.5, 3.0], [1.5, -0.5, 0.2]])
Y = np.array([1, 2, 0])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def expected_kd(s, t, y, temperature, alpha):
    """alpha*T^2*KL(p_t||p_s) + (1-alpha)*CE(s, y); pure T^2*KL when y is None."""
    log_ps, log_pt = _log_softmax(s / temperature), _log_softmax(t / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()  # batchmean
    soft = temperature**2 * kl
    if y is None:
        return soft
    ce = -_log_softmax(s)[np.arange(len(y)), y].mean()
    return alpha * soft + (1 - alpha) * ce


def kd(temperature=4.0, alpha=0.9):
    return losses.build({"type": "kd", "temperature": temperature, "alpha": alpha})


def _call(loss, s, t, y, dtype=torch.float64):
    labels = None if y is None else torch.from_numpy(y)
    return float(loss(torch.tensor(s, dtype=dtype), torch.tensor(t, dtype=dtype), labels))


@pytest.mark.parametrize(
    "temperature,alpha,labelled",
    [(4.0, 0.9, True), (1.0, 0.9, True), (2.0, 1.0, True), (3.0, 0.0, True), (4.0, 0.5, False), (1.0, 0.0, False)],
)
def test_kd_matches_formula(temperature, alpha, labelled):
    y = Y if labelled else None
    want = expected_kd(S, T, y, temperature, alpha)
    assert _call(kd(temperature, alpha), S, T, y) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert _call(kd(temperature, alpha), S, T, y, torch.float32) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kd_hand_computed_constants():
    # Frozen numbers (numpy, float64) so a silent change of the formula in
    # *both* places above still gets caught.
    assert _call(kd(1.0, 1.0), S, T, Y) == pytest.approx(0.26604193549177974, rel=1e-12)
    assert _call(kd(1.0, 0.0), S, T, Y) == pytest.approx(0.5769951783320099, rel=1e-12)
    assert _call(kd(4.0, 0.9), S, T, None) == pytest.approx(0.3304283405968712, rel=1e-12)


def test_kd_closed_form_two_classes():
    # Student uniform, teacher p = [3/4, 1/4] at T=1 (logits ln 3, 0):
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); CE for label 0 = ln 2.
    s, t, y = np.array([[0.0, 0.0]]), np.array([[np.log(3.0), 0.0]]), np.array([0])
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    assert _call(kd(1.0, 1.0), s, t, y) == pytest.approx(kl, rel=1e-12)
    assert _call(kd(1.0, 0.5), s, t, y) == pytest.approx(0.5 * kl + 0.5 * np.log(2.0), rel=1e-12)
    # T=2: teacher logits halve -> p = [sqrt3, 1] / (sqrt3 + 1); student stays uniform; x T^2 = 4.
    p = np.array([np.sqrt(3.0), 1.0]) / (np.sqrt(3.0) + 1.0)
    assert _call(kd(2.0, 0.3), s, t, None) == pytest.approx(4.0 * float((p * np.log(2 * p)).sum()), rel=1e-12)


def test_alpha_zero_is_cross_entropy_and_alpha_ignored_without_labels():
    ce = torch.nn.functional.cross_entropy(torch.tensor(S), torch.from_numpy(Y)).item()
    assert _call(kd(4.0, 0.0), S, T, Y) == pytest.approx(ce, rel=1e-12)
    assert _call(kd(4.0, 0.0), S, T, None) == pytest.approx(_call(kd(4.0, 1.0), S, T, None), rel=1e-12)


def test_identical_logits_have_zero_soft_loss():
    assert _call(kd(4.0, 1.0), T, T, None) == pytest.approx(0.0, abs=1e-12)


def test_kd_gradient_flows_to_student_only():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T)
    kd()(s, t, torch.from_numpy(Y)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---- soft_ce, hard, mse, cosine: numpy golden values ------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))


def expected_soft_ce(s, t, temperature, w):
    """T^2 * mean_i(-sum q log p) + w * mean_i(-sum r log r); q=softmax(t/T), p=softmax(s/T), r=softmax(s)."""
    q = _softmax(t / temperature)
    ce = -(q * _log_softmax(s / temperature)).sum(axis=1).mean() * temperature**2
    log_r = _log_softmax(s)
    h = -(np.exp(log_r) * log_r).sum(axis=1).mean()
    return ce + w * h


def expected_hard(s, t, eps):
    """CE with target (1-eps)*onehot(argmax t) + eps/C."""
    c = s.shape[1]
    target = np.full(s.shape, eps / c)
    target[np.arange(len(s)), t.argmax(axis=1)] += 1 - eps
    return -(target * _log_softmax(s)).sum(axis=1).mean()


def expected_mse(s, t, target):
    if target == "probabilities":
        s, t = _softmax(s), _softmax(t)
    return ((s - t) ** 2).mean()


def expected_cosine(s, t, w):
    cos = (s * t).sum(1) / np.maximum(np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1), 1e-8)
    return (1 - cos).mean() + w * ((s - t) ** 2).mean()


def build(type_, **cfg):
    return losses.build({"type": type_, **cfg})


@pytest.mark.parametrize("temperature,w", [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (4.0, -0.3), (3.0, 2.0)])
@pytest.mark.parametrize("labelled", [True, False])
def test_soft_ce_matches_formula(temperature, w, labelled):
    loss = build("soft_ce", temperature=temperature, entropy_weight=w)
    want = expected_soft_ce(S, T, temperature, w)
    y = Y if labelled else None
    assert _call(loss, S, T, y) == pytest.approx(want, rel=1e-12)
    assert _call(loss, S, T, y, torch.float32) == pytest.approx(want, rel=1e-5)


def test_soft_ce_is_kd_plus_teacher_entropy():
    # CE(q, p) = KL(q || p) + H(q): same gradients as kd(alpha=1), shifted by the constant T^2 H(q).
    for temperature in (1.0, 4.0):
        q = _softmax(T / temperature)
        h_q = -(q * np.log(q)).sum(1).mean() * temperature**2
        got = _call(build("soft_ce", temperature=temperature), S, T, None)
        assert got == pytest.approx(_call(kd(temperature, 1.0), S, T, None) + h_q, rel=1e-12)


def test_soft_ce_hand_computed_constants():
    assert _call(build("soft_ce", temperature=1.0, entropy_weight=0.0), S, T, None) == pytest.approx(
        0.9559942457884757, rel=1e-12)
    assert _call(build("soft_ce", temperature=2.0, entropy_weight=0.5), S, T, None) == pytest.approx(
        4.605544300769873, rel=1e-12)
    # two classes, student uniform, teacher [3/4, 1/4]: CE = ln 2 (student uniform), H(student) = ln 2
    s, t = np.array([[0.0, 0.0]]), np.array([[np.log(3.0), 0.0]])
    assert _call(build("soft_ce", temperature=1.0, entropy_weight=1.0), s, t, None) == pytest.approx(
        2 * np.log(2.0), rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 0.9])
def test_hard_matches_formula_and_ignores_labels(eps):
    loss = build("hard", label_smoothing=eps)
    want = expected_hard(S, T, eps)
    assert _call(loss, S, T, None) == pytest.approx(want, rel=1e-12)
    assert _call(loss, S, T, Y) == pytest.approx(want, rel=1e-12)
    assert _call(loss, S, T, None, torch.float32) == pytest.approx(want, rel=1e-5)


def test_hard_hand_computed_constants():
    # argmax T = [0, 2, 0]
    assert _call(build("hard"), S, T, None) == pytest.approx(0.9103285116653432, rel=1e-12)
    assert _call(build("hard", label_smoothing=0.1), S, T, None) == pytest.approx(0.9636618449986768, rel=1e-12)
    s, t = np.array([[0.0, 0.0]]), np.array([[0.0, 5.0]])
    assert _call(build("hard"), s, t, None) == pytest.approx(np.log(2.0), rel=1e-12)


@pytest.mark.parametrize("target", ["outputs", "probabilities"])
def test_mse_matches_formula(target):
    loss = build("mse", target=target)
    want = expected_mse(S, T, target)
    assert _call(loss, S, T, None) == pytest.approx(want, rel=1e-12)
    assert _call(loss, S, T, Y) == pytest.approx(want, rel=1e-12)


def test_mse_constants_regression_and_tasks():
    assert _call(build("mse"), S, T, None) == pytest.approx(0.9244444444444443, rel=1e-12)
    assert _call(build("mse", target="probabilities"), S, T, None) == pytest.approx(0.06243518855119255, rel=1e-12)
    # [B, 1] regression outputs with float labels (unused)
    s, t = np.array([[1.0], [2.0], [-1.0]]), np.array([[1.5], [0.0], [-1.0]])
    got = float(build("mse")(torch.tensor(s), torch.tensor(t), torch.tensor([9.0, 9.0, 9.0])))
    assert got == pytest.approx((0.25 + 4.0) / 3, rel=1e-12)
    from jobspec.rules import loss_tasks

    assert loss_tasks(build("mse").config) == {"classification", "regression", "embedding"}
    assert loss_tasks(build("mse", target="probabilities").config) == {"classification"}


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_cosine_matches_formula(w):
    loss = build("cosine", mse_weight=w)
    want = expected_cosine(S, T, w)
    assert _call(loss, S, T, None) == pytest.approx(want, rel=1e-12)
    assert _call(loss, S, T, None, torch.float32) == pytest.approx(want, rel=1e-5)


def test_cosine_constants():
    # orthogonal rows -> 1, identical -> 0, opposite -> 2
    s = np.array([[1.0, 0.0], [1.0, 2.0], [1.0, -1.0]])
    t = np.array([[0.0, 3.0], [2.0, 4.0], [-2.0, 2.0]])
    assert _call(build("cosine"), s, t, None) == pytest.approx(1.0, rel=1e-12)
    # + w * mean((s-t)^2) = (1+9+1+4+9+9)/6 = 5.5
    assert _call(build("cosine", mse_weight=2.0), s, t, None) == pytest.approx(1.0 + 2 * 5.5, rel=1e-12)
    assert _call(build("cosine"), S, T, None) == pytest.approx(0.4762210772630426, rel=1e-12)


def test_every_loss_has_gradients():
    from engine.registry import losses as reg

    for name in reg.names():
        if name == "token_kd":  # per-token distributions [B, T, V]: tests/engine/lm/test_divergence.py
            continue
        loss = reg.build({"type": name})
        assert loss.name == name
        s = torch.tensor(S, requires_grad=True)
        loss(s, torch.tensor(T), None).backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
