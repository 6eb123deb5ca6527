"""Student families: shapes, TorchScript + ONNX export, rebuild from architecture, init from teacher."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from engine.students import architecture, common, uploaded
from engine.registry import students
from engine.values import InputInfo, ModelSource, TeacherInfo
from engine.errors import EngineError

IDS = InputInfo("input_ids", (12,), True, 99)
MASK = InputInfo("attention_mask", (12,), True, 1)


def _tokens(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (b, 12), generator=g)
    mask = torch.ones(b, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 3:] = 0
    return ids, mask


CASES = [
    ({"family": "mlp", "hidden": [32, 16]}, [InputInfo("x", (64,))], lambda: [torch.rand(3, 64)]),
    ({"family": "mlp"}, [InputInfo("x", (8, 8))], lambda: [torch.rand(3, 8, 8)]),
    ({"family": "cnn", "channels": [8, 16], "hidden": [32]}, [InputInfo("x", (1, 8, 8))],
     lambda: [torch.rand(3, 1, 8, 8)]),
    ({"family": "cnn", "kernel_size": 5}, [InputInfo("x", (8, 8))], lambda: [torch.rand(3, 8, 8)]),
    ({"family": "resnet", "depth": 4, "width": 8}, [InputInfo("x", (3, 16, 16))], lambda: [torch.rand(3, 3, 16, 16)]),
    ({"family": "resnet", "depth": 1, "width": 4}, [InputInfo("x", (8, 8))], lambda: [torch.rand(3, 8, 8)]),
    ({"family": "embedding_bag", "hidden": [16]}, [IDS, MASK], lambda: list(_tokens())),
    ({"family": "embedding_bag", "embedding_dim": 8}, [IDS], lambda: [_tokens()[0]]),
    ({"family": "text_transformer", "d_model": 32, "heads": 4, "ff": 64}, [IDS, MASK], lambda: list(_tokens())),
    ({"family": "text_transformer", "d_model": 16, "heads": 2, "layers": 1, "ff": 32, "max_len": 20}, [IDS],
     lambda: [_tokens()[0]]),
]


@pytest.mark.parametrize("cfg,inputs,make", CASES, ids=[f"{c[0]['family']}-{i}" for i, c in enumerate(CASES)])
def test_family_shapes_script_onnx_and_rebuild(cfg, inputs, make):
    import onnxruntime as ort

    torch.manual_seed(0)
    model, arch = students.build(cfg).create(inputs, 10, None)
    model.eval()
    xs = make()
    with torch.no_grad():
        out = model(*xs)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(*xs), out, atol=1e-5)
        rebuilt = architecture.from_architecture(arch)
        rebuilt.load_state_dict(model.state_dict())
        assert torch.allclose(rebuilt.eval()(*xs), out, atol=1e-6)
    f = io.BytesIO()
    names = [i.name for i in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(xs[:1] and [x[:2] for x in xs]), f, dynamo=False, input_names=names,
                          output_names=["out"], dynamic_axes={n: {0: "b"} for n in names + ["out"]},
                          opset_version=17)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0]
    np.testing.assert_allclose(got, out.numpy(), atol=1e-4)


def test_text_transformer_respects_the_mask_and_survives_an_empty_row():
    model, _ = students.build({"family": "text_transformer", "d_model": 16, "heads": 2, "ff": 32}).create(
        [IDS, MASK], 4, None)
    model.eval()
    ids, mask = _tokens()
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100  # padding positions only
    with torch.no_grad():
        assert torch.allclose(model(ids, mask)[0], model(changed, mask)[0], atol=1e-5)
        empty = torch.zeros_like(mask)
        assert torch.isfinite(model(ids, empty)).all()


def test_from_architecture_minimal_teacher_dicts():
    m = architecture.from_architecture({"family": "mlp", "in_features": 64, "hidden": [256, 256], "out_features": 10})
    assert m(torch.rand(2, 64)).shape == (2, 10) and common.num_parameters(m) == 64 * 256 + 256 + 256 * 256 + 256 + 2570
    assert architecture.from_architecture({"family": "cnn", "input_shape": [1, 8, 8], "out_features": 3})(
        torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert architecture.from_architecture({"family": "resnet", "input_shape": [3, 8, 8], "out_features": 3})(
        torch.rand(2, 3, 8, 8)).shape == (2, 3)
    assert architecture.from_architecture({"family": "embedding_bag", "vocab_size": 50, "out_features": 3})(
        torch.randint(0, 50, (2, 5))).shape == (2, 3)
    assert architecture.from_architecture({"family": "text_transformer", "vocab_size": 50, "out_features": 3})(
        torch.randint(0, 50, (2, 5))).shape == (2, 3)
    with pytest.raises(EngineError) as e:
        architecture.from_architecture({"family": "nope"})
    assert e.value.code == "unsupported"
    with pytest.raises(EngineError) as e:
        architecture.from_architecture({"family": "mlp", "hidden": [3]})
    assert e.value.code == "invalid_model"


def test_input_errors():
    with pytest.raises(EngineError) as e:
        students.build({"family": "cnn"}).create([InputInfo("x", (64,))], 10)
    assert e.value.code == "shape_mismatch"
    with pytest.raises(EngineError) as e:
        students.build({"family": "embedding_bag"}).create([InputInfo("x", (12,))], 10)
    assert e.value.code == "shape_mismatch"
    with pytest.raises(EngineError) as e:
        students.build({"family": "embedding_bag", "vocab_size": 50}).create([IDS], 10)
    assert e.value.code == "shape_mismatch"
    with pytest.raises(EngineError) as e:
        students.build({"family": "text_transformer", "d_model": 30, "heads": 4})
    assert e.value.code == "invalid_spec"
    with pytest.raises(EngineError) as e:
        students.build({"family": "mlp", "init": "teacher"}).create([InputInfo("x", (4,))], 2,
                                                                    TeacherInfo(None, None, "onnx"))
    assert e.value.code == "unsupported"


def _mlp_teacher():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@pytest.mark.parametrize("scripted", [False, True])
def test_mlp_init_from_teacher_copies_first_and_last(scripted):
    teacher = _mlp_teacher()
    module = torch.jit.script(teacher) if scripted else teacher
    model, arch = students.build({"family": "mlp", "hidden": [256, 256], "init": "teacher"}).create(
        [InputInfo("x", (64,))], 10, TeacherInfo(module, None, "torchscript"))
    assert arch["init_from_teacher"] == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    assert torch.equal(model[1].weight, teacher[1].weight) and torch.equal(model[5].weight, teacher[7].weight)
    # middle: student hidden layer 2 (index 3) <- teacher middle layer 0 (index 3)
    assert torch.equal(model[3].weight, teacher[3].weight)
    # a narrower student copies only what fits: nothing here
    _, arch = students.build({"family": "mlp", "hidden": [32], "init": "teacher"}).create(
        [InputInfo("x", (64,))], 10, TeacherInfo(module, None, "torchscript"))
    assert arch["init_from_teacher"] == []


def test_cnn_init_copies_conv_with_its_batchnorm():
    teacher, _ = students.build({"family": "cnn", "channels": [8, 16, 16]}).create([InputInfo("x", (1, 8, 8))], 10)
    with torch.no_grad():
        teacher[1].running_mean.uniform_()
    model, arch = students.build({"family": "cnn", "channels": [8, 16], "init": "teacher"}).create(
        [InputInfo("x", (1, 8, 8))], 10, TeacherInfo(teacher, None, "torchscript"))
    assert "0.weight" in arch["init_from_teacher"] and "1.running_mean" in arch["init_from_teacher"]
    assert torch.equal(model[1].running_mean, teacher[1].running_mean)


def test_text_transformer_every_other_layer_from_a_deeper_teacher():
    torch.manual_seed(0)
    teacher, _ = students.build({"family": "text_transformer", "d_model": 32, "heads": 4, "ff": 64, "layers": 4}
                                ).create([IDS, MASK], 5)
    model, arch = students.build({"family": "text_transformer", "d_model": 32, "heads": 4, "ff": 64, "layers": 2,
                                  "init": "teacher"}).create([IDS, MASK], 5, TeacherInfo(teacher, None, "torchscript"))
    copied = arch["init_from_teacher"]
    assert "embedding.weight" in copied and "position.weight" in copied and "head.weight" in copied
    for i, j in ((0, 0), (1, 2)):
        for (n, p), (_, q) in zip(model.encoder.layers[i].named_parameters(), teacher.encoder.layers[j].named_parameters()):
            assert torch.equal(p, q), n
            assert f"encoder.layers.{i}.{n}" in copied
    assert arch["vocab_size"] == 100


def test_embedding_bag_projects_a_wider_teacher_table_by_svd():
    torch.manual_seed(0)
    teacher = architecture.from_architecture({"family": "embedding_bag", "vocab_size": 100, "embedding_dim": 32,
                                   "out_features": 3})
    info = TeacherInfo(torch.jit.script(teacher), None, "torchscript")
    model, arch = students.build({"family": "embedding_bag", "embedding_dim": 8, "init": "teacher"}).create(
        [IDS], 3, info)
    assert arch["init_from_teacher"][0] == "embedding.weight"
    w = teacher.embedding.weight.detach().double().numpy()
    _, _, vt = np.linalg.svd(w, full_matrices=False)
    want = w @ vt[:8].T
    got = model.embedding.weight.detach().double().numpy()
    # singular vectors are defined up to sign: compare column by column
    for c in range(8):
        assert min(abs(got[:, c] - want[:, c]).max(), abs(got[:, c] + want[:, c]).max()) < 1e-4
    # same width, no embedding_dim given: the teacher's width, copied verbatim
    model, arch = students.build({"family": "embedding_bag", "init": "teacher"}).create([IDS], 3, info)
    assert arch["embedding_dim"] == 32 and torch.equal(model.embedding.weight, teacher.embedding.weight)


def test_load_uploaded_wraps_the_loader(tmp_path):
    seen = {}

    def loader(path, fmt, arch):
        seen.update(path=path, fmt=fmt, arch=arch)
        m = torch.jit.script(nn.Sequential(nn.Linear(4, 3)))
        for p in m.parameters():
            p.requires_grad_(False)
        return m.eval()

    model, arch = uploaded.load_uploaded(ModelSource(tmp_path / "s.pt", "torchscript"), loader)
    assert arch == {"family": "uploaded", "format": "torchscript"} and seen["fmt"] == "torchscript"
    assert model.training and all(p.requires_grad for p in model.parameters())

    def st_loader(path, fmt, arch):
        return architecture.from_architecture(arch)

    a = {"family": "mlp", "in_features": 4, "hidden": [8], "out_features": 2}
    model, arch = uploaded.load_uploaded(ModelSource(tmp_path / "s.safetensors", "safetensors", a), st_loader)
    assert arch["family"] == "mlp" and architecture.from_architecture(arch)(torch.rand(1, 4)).shape == (1, 2)


def test_student_builder_dispatches_on_the_spec_type():
    from engine.students.derive import DerivedStudent
    from tests.support.students import build_student

    assert build_student({"family": "mlp"}).name == "mlp"
    assert isinstance(build_student({"derive": {"width": 0.5}}), DerivedStudent)
