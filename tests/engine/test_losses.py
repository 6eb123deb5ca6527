"""Golden values for the kd loss, computed independently in numpy from the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.registry import losses
import worker.engine.losses  # noqa: F401  (registers "kd")

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
