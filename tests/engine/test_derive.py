"""Derived students: shrink a known architecture or a plain layer chain; rebuild_chain; errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.students import derive
from engine.students import architecture, common
from engine.values import InputInfo, TeacherInfo
from engine.errors import EngineError

X64 = [InputInfo("x", (64,))]
IMG = [InputInfo("x", (1, 8, 8))]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10)).eval()


def _derive(width, depth, init="random"):
    return derive.build({"derive": {"width": width, "depth": depth}, "init": init})


@pytest.mark.parametrize("scripted", [False, True])
def test_rebuild_chain_is_an_exact_eager_copy(scripted):
    for teacher, x in ((_mlp(), torch.rand(4, 64)), (_cnn(), torch.rand(4, 1, 8, 8))):
        src = torch.jit.script(teacher) if scripted else teacher
        copy = derive.rebuild_chain(src).eval()
        assert not isinstance(copy, torch.jit.ScriptModule)
        assert torch.allclose(copy(x), teacher(x), atol=1e-6)
        rebuilt = architecture.from_architecture(derive.chain_architecture(copy))
        rebuilt.load_state_dict(copy.state_dict())
        assert torch.allclose(rebuilt.eval()(x), teacher(x), atol=1e-6)


def test_derive_from_known_architectures_has_fewer_parameters():
    cases = [
        ({"family": "mlp", "in_features": 64, "hidden": [256, 256], "out_features": 10}, X64, (0.5, 1.0),
         {"hidden": [128, 128]}),
        ({"family": "mlp", "in_features": 64, "hidden": [256, 256, 256, 256], "out_features": 10}, X64, (0.25, 0.5),
         {"hidden": [64, 64]}),
        ({"family": "cnn", "input_shape": [1, 8, 8], "channels": [16, 32], "hidden": [64], "out_features": 10}, IMG,
         (0.5, 1.0), {"channels": [8, 16], "hidden": [32]}),
        ({"family": "resnet", "input_shape": [3, 8, 8], "depth": 6, "width": 16, "out_features": 10},
         [InputInfo("x", (3, 8, 8))], (0.5, 0.5), {"depth": 3, "width": 8}),
        ({"family": "text_transformer", "vocab_size": 50, "d_model": 64, "heads": 4, "ff": 128, "layers": 4,
          "max_len": 12, "out_features": 3}, [InputInfo("ids", (12,), True, 49)], (0.5, 0.5),
         {"d_model": 32, "ff": 64, "layers": 2}),
        ({"family": "embedding_bag", "vocab_size": 50, "embedding_dim": 32, "hidden": [64], "out_features": 3},
         [InputInfo("ids", (12,), True, 49)], (0.5, 1.0), {"embedding_dim": 16, "hidden": [32]}),
    ]
    for arch, inputs, (w, d), want in cases:
        teacher = architecture.from_architecture(arch)
        model, new = _derive(w, d).create(inputs, arch["out_features"], TeacherInfo(None, arch, "safetensors"))
        for k, v in want.items():
            assert new[k] == v, (arch["family"], k, new[k])
        assert common.num_parameters(model) < common.num_parameters(teacher)
        print(arch["family"], common.num_parameters(teacher), "->", common.num_parameters(model))


def test_derive_depth_halved_transformer_copies_every_other_layer():
    arch = {"family": "text_transformer", "vocab_size": 50, "d_model": 32, "heads": 4, "ff": 64, "layers": 4,
            "max_len": 12, "out_features": 3}
    teacher = architecture.from_architecture(arch)
    model, new = _derive(1.0, 0.5, "teacher").create([InputInfo("ids", (12,), True, 49)], 3,
                                                     TeacherInfo(teacher, arch, "safetensors"))
    assert new["layers"] == 2
    assert torch.equal(model.encoder.layers[1].linear1.weight, teacher.encoder.layers[2].linear1.weight)
    assert "encoder.layers.1.linear1.weight" in new["init_from_teacher"]


@pytest.mark.parametrize("scripted", [False, True])
def test_derive_from_a_chain(scripted):
    teacher = _mlp()
    src = torch.jit.script(teacher) if scripted else teacher
    model, arch = _derive(0.5, 1.0, "teacher").create(X64, 10, TeacherInfo(src, None, "torchscript"))
    assert arch["family"] == "sequential" and [layer["out"] for layer in arch["layers"] if layer["type"] == "linear"] == [128, 128, 10]
    assert common.num_parameters(model) == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10 < common.num_parameters(teacher)
    assert arch["init_from_teacher"] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    # the kept first-layer units are the teacher's strongest, in order
    keep = torch.sort(torch.topk(teacher[0].weight.norm(dim=1), 128).indices).values
    assert torch.equal(model[0].weight, teacher[0].weight[keep])
    rebuilt = architecture.from_architecture(arch)
    rebuilt.load_state_dict(model.state_dict())


def test_derive_cnn_chain_and_identity_at_full_size():
    teacher = _cnn()
    model, arch = _derive(0.5, 1.0, "teacher").create(IMG, 10, TeacherInfo(torch.jit.script(teacher), None, "ts"))
    assert common.num_parameters(model) < common.num_parameters(teacher)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert "8.weight" in arch["init_from_teacher"]  # the Linear after Flatten, sliced by kept channels
    full, _ = _derive(1.0, 1.0, "teacher").create(IMG, 10, TeacherInfo(teacher, None, "ts"))
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(full.eval()(x), teacher(x), atol=1e-6)
    shallow, arch = _derive(0.5, 0.5).create(IMG, 10, TeacherInfo(teacher, None, "ts"))
    assert sum(1 for layer in arch["layers"] if layer["type"] in ("conv2d", "linear")) == 3
    assert shallow(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_unsupported_graphs_name_the_layer():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(EngineError) as e:
        _derive(0.5, 1.0).create(X64, 10, TeacherInfo(nn.Sequential(nn.Linear(64, 8), nn.LSTM(8, 8)), None, "ts"))
    assert e.value.code == "unsupported" and "LSTM" in e.value.message
    with pytest.raises(EngineError) as e:
        _derive(0.5, 1.0).create(X64, 10, TeacherInfo(Custom(), None, "ts"))
    assert "Custom" in e.value.message
    with pytest.raises(EngineError) as e:
        _derive(0.5, 1.0).create(X64, 10, TeacherInfo(None, None, "onnx"))
    assert e.value.code == "unsupported"
    with pytest.raises(EngineError) as e:
        derive.build({"derive": {"width": 1.5}})
    assert e.value.code == "invalid_spec"


def test_student_builder_routes_derive():
    from tests.support.students import build_student

    assert build_student({"derive": {"width": 0.5, "depth": 1.0}, "init": "random"}).config.width == 0.5
