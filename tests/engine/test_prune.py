"""Pruning: magnitude/random/layer (unstructured, real zeros) and channel (structured, smaller shapes)."""

from __future__ import annotations

import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn

from engine.compression.pruning import (
    prune,
    prune_step,
    prune_steps,
    pruners,
    reapply_masks,
    schedule_amounts,
    zero_masks,
)
from engine.errors import EngineError

from .compression_fixtures import accuracy, kd_finetune, predict, ts_roundtrip


def _linear_zero_fraction(module) -> float:
    weights = [t for k, t in module.state_dict().items() if k.endswith("weight") and t.dim() == 2]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total


def test_magnitude_global_08_keeps_zeros_through_torchscript_and_recovers_with_kd(split, teacher):
    xtr, ytr, xte, yte = split
    result = prune(teacher, {"method": "magnitude", "amount": 0.8, "scope": "global", "finetune": {"epochs": 2}},
                   example_inputs=(xtr[:2],))
    model = result.model
    assert result.stats["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert result.stats["parameters_after"] == result.stats["parameters_before"]
    assert result.stats["nonzero_after"] < 0.25 * result.stats["nonzero_before"]
    assert not any("weight_orig" in k or "mask" in k for k in model.state_dict())
    assert teacher[2].weight.count_nonzero() == teacher[2].weight.numel()  # the input model is untouched

    masks = zero_masks(model)
    kd_finetune(model, teacher, xtr, ytr, epochs=2, after_step=lambda m: reapply_masks(m, masks))
    loaded = ts_roundtrip(model, (xtr[:2],), how="script")
    assert _linear_zero_fraction(loaded) >= 0.75
    assert torch.equal(predict(loaded, xte), predict(model, xte))
    assert accuracy(loaded, xte, yte) >= accuracy(teacher, xte, yte) - 0.02


def test_magnitude_layer_scope_prunes_each_layer_equally(split, teacher):
    result = prune(teacher, {"method": "magnitude", "amount": 0.5, "scope": "layer"}, example_inputs=(split[0][:2],))
    for layer in result.model:
        if isinstance(layer, nn.Linear):
            assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_random_is_seeded_and_per_layer(split, cnn):
    x = split[0][:2].view(-1, 1, 8, 8)
    torch.manual_seed(3)
    a = prune(cnn, {"method": "random", "amount": 0.4}, example_inputs=(x,)).model
    torch.manual_seed(3)
    b = prune(cnn, {"method": "random", "amount": 0.4}, example_inputs=(x,)).model
    for la, lb in zip(a, b):
        if isinstance(la, (nn.Linear, nn.Conv2d)):
            assert torch.equal(la.weight, lb.weight)
            assert float((la.weight == 0).float().mean()) == pytest.approx(0.4, abs=0.02)


def test_layer_method_spreads_sparsity_by_importance(split, cnn):
    x = split[0].view(-1, 1, 8, 8)
    result = prune(cnn, {"method": "layer", "amount": 0.6}, example_inputs=(x[:2],), importance_data=(x[:256],))
    assert result.stats["sparsity"] == pytest.approx(0.6, abs=0.01)
    amounts = result.stats["layer_amounts"]
    assert len(set(amounts.values())) > 1  # not uniform
    # without data: the size-normalised L1 rule still hits the mean exactly
    result2 = prune(cnn, {"method": "layer", "amount": 0.6}, example_inputs=(x[:2],))
    assert result2.stats["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_channel_05_shrinks_the_mlp_and_recovers_with_kd(split, teacher, tmp_path):
    xtr, ytr, xte, yte = split
    result = prune(teacher, {"method": "channel", "amount": 0.5}, example_inputs=(xtr[:2],))
    model = result.model
    assert result.stats["parameters_after"] <= 0.6 * result.stats["parameters_before"]
    assert [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)] == [(600, 64), (600, 600), (10, 600)]
    assert model(xte[:3]).shape == (3, 10)

    kd_finetune(model, teacher, xtr, ytr, epochs=2)
    assert accuracy(model, xte, yte) >= accuracy(teacher, xte, yte) - 0.02

    for how in ("script", "trace"):
        assert torch.equal(predict(ts_roundtrip(model, (xtr[:2],), how=how), xte), predict(model, xte))
    path = tmp_path / "pruned.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (xtr[:2],), str(path), input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    out = ort.InferenceSession(str(path)).run(None, {"x": xte.numpy()})[0]
    assert (torch.from_numpy(out).argmax(1) == predict(model, xte)).float().mean() >= 0.99


def test_channel_on_cnn_rewires_batchnorm_and_flatten(split, cnn):
    x = split[2].view(-1, 1, 8, 8)
    result = prune(cnn, {"method": "channel", "amount": 0.5}, example_inputs=(x[:2],))
    convs = [m for m in result.model if isinstance(m, nn.Conv2d)]
    bns = [m for m in result.model if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [8, 16] and [b.num_features for b in bns] == [8, 16]
    assert result.model[-1].out_features == 10
    assert result.stats["parameters_after"] <= 0.6 * result.stats["parameters_before"]
    loaded = ts_roundtrip(result.model, (x[:2],))
    assert torch.equal(predict(loaded, x), predict(result.model, x))


def test_iterative_schedule_and_steps(split, teacher):
    assert schedule_amounts(0.75, 2) == pytest.approx([0.5, 0.75])
    seen = []
    for r in prune_steps(teacher, {"method": "magnitude", "amount": 0.75, "iterations": 2}, example_inputs=(split[0][:2],)):
        seen.append((r.stats["iteration"], round(r.stats["sparsity"], 2)))
    assert seen == [(1, 0.5), (2, 0.75)]
    # prune_step works on an eager model in place (the pipeline fine-tunes in between)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for k in (1, 2, 3):
        r = prune_step(model, {"method": "channel", "amount": 0.5, "iterations": 3}, k, 3, example_inputs=(torch.randn(2, 8),))
    assert model[0].out_features == 8 and r.model is model


def test_torchscript_teacher_is_pruned_via_editable(split, teacher):
    scripted = torch.jit.script(teacher)
    result = prune(scripted, {"method": "magnitude", "amount": 0.5}, example_inputs=(split[0][:2],))
    assert isinstance(result.model, nn.Sequential)
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_bad_configs_are_invalid_spec():
    assert set(pruners.names()) == {"magnitude", "random", "layer", "channel"}
    model = nn.Sequential(nn.Linear(4, 4))
    for cfg in ({"method": "magnitude", "amount": 1.5}, {"method": "nope", "amount": 0.5},
                {"method": "magnitude", "amount": 0.5, "scope": "everything"}, {"method": "random", "amount": 0.5, "iterations": 0}):
        with pytest.raises(EngineError) as exc:
            prune(model, cfg, example_inputs=(torch.randn(2, 4),))
        assert exc.value.code == "invalid_spec"
