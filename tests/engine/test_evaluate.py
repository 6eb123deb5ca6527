"""Metric helpers against sklearn, and the latency helper's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from engine.metrics import classification_metrics, f1_macro
from engine.report.latency import median_latency_ms
from engine.report.rows import canonical_json, latency_batch, spec_sha256


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_macro_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 9, 200))  # includes classes absent from y
    assert f1_macro(torch.from_numpy(pred), torch.from_numpy(y)) == pytest.approx(f1_score(y, pred, average="macro"))


def test_classification_metrics_keys():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    m = classification_metrics(logits, teacher, torch.tensor([0, 1, 1]))
    assert m["accuracy"] == pytest.approx(2 / 3) and m["agreement"] == pytest.approx(2 / 3)
    assert set(classification_metrics(logits, teacher, None)) == {"agreement"}


def test_latency_is_a_positive_median_and_respects_the_budget():
    calls = []
    ms = median_latency_ms(lambda: calls.append(1), warmup=5, runs=25)
    assert ms >= 0 and len(calls) == 30
    import time

    slow = []
    started = time.perf_counter()
    ms = median_latency_ms(lambda: (slow.append(1), time.sleep(0.05)), warmup=5, runs=25, budget_s=0.2)
    assert ms >= 50 and time.perf_counter() - started < 0.6 and len(slow) < 10


def test_latency_batch_repeats_rows():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert latency_batch(x, 1).shape == (1, 2)
    b = latency_batch(x, 32)
    assert b.shape == (32, 2) and b.flags.c_contiguous
    np.testing.assert_array_equal(b[3], x[0])


def test_spec_hash_is_canonical():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert spec_sha256({"b": 1, "a": 2}) == spec_sha256({"a": 2, "b": 1})
