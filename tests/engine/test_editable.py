"""to_editable: TorchScript / torch.export layer chains become eager nn.Sequential with the same outputs."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from engine.compression.editable import to_editable
from engine.errors import EngineError

from .compression_fixtures import make_cnn


def _reloaded(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_mlp_becomes_identical_sequential(split, teacher, how):
    x = split[2]
    ts = torch.jit.script(teacher) if how == "script" else torch.jit.trace(teacher, (x[:2],))
    eager = to_editable(_reloaded(ts))
    assert isinstance(eager, nn.Sequential) and not isinstance(eager, torch.jit.ScriptModule)
    assert [type(m).__name__ for m in eager] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    with torch.no_grad():
        assert torch.equal(eager(x), teacher(x))
    assert eager[2].weight.requires_grad  # trainable parameters, not constants


def test_torch_export_mlp_becomes_identical_sequential(split, teacher, tmp_path):
    x = split[2]
    ep = torch.export.export(teacher, (x[:2],))
    torch.export.save(ep, tmp_path / "t.pt2")
    loaded = torch.export.load(tmp_path / "t.pt2")
    for source in (loaded, loaded.module()):
        eager = to_editable(source)
        with torch.no_grad():
            assert torch.equal(eager(x), teacher(x))


def test_cnn_with_every_supported_kind_of_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, stride=1), nn.BatchNorm2d(8), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(approximate="tanh"), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.LeakyReLU(0.2), nn.Dropout(0.1),
        nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3), nn.Sigmoid(),
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 1, 8, 8)
    for source in (torch.jit.script(model), torch.jit.trace(model, (x,)), torch.export.export(model, (x,)), model):
        eager = to_editable(source, (x,))
        with torch.no_grad():
            assert torch.allclose(eager(x), model(x), atol=1e-6)
    assert to_editable(model) is not model  # eager chains are copied, never aliased


def test_scripted_cnn_without_example_inputs_guesses_the_image_size():
    model = make_cnn().eval()
    eager = to_editable(torch.jit.script(model))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(eager(x), model(x), atol=1e-6)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.fc(x))


class Doubler(nn.Module):
    def forward(self, x):
        return x * 2


def test_residual_add_is_unsupported_and_named():
    x = torch.randn(2, 4)
    sources = {
        "script": torch.jit.script(Residual()),
        "trace": torch.jit.trace(Residual(), (x,)),
        "export": torch.export.export(Residual(), (x,)),
        "eager": Residual(),
    }
    for name, source in sources.items():
        with pytest.raises(EngineError) as exc:
            to_editable(source, (x,))
        assert exc.value.code == "unsupported", name
        assert "add" in exc.value.message and "supported:" in exc.value.message, (name, exc.value.message)


def test_custom_layer_is_named():
    with pytest.raises(EngineError, match="layer Doubler"):
        to_editable(torch.jit.script(nn.Sequential(nn.Linear(4, 4), Doubler())))
    with pytest.raises(EngineError, match="layer Doubler"):
        to_editable(nn.Sequential(nn.Linear(4, 4), Doubler()))
