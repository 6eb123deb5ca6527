"""Quantization: dynamic/static int8, fp16/bf16, ONNX Runtime int8, QAT; sizes, accuracy, reload."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engine.compression.onnx_quantization import export_onnx, quantize_onnx
from engine.compression.quantization import (
    load_torchscript,
    quantize,
    quantizers,
    size_bytes,
    torchscript_bytes,
)
from engine.errors import EngineError

from .compression_fixtures import accuracy, kd_finetune, predict


def _calibration(x, n=8, bs=32):
    return [(x[i * bs:(i + 1) * bs],) for i in range(n)]


def test_dynamic_int8_is_small_accurate_and_torchscript_roundtrips(split, teacher):
    xtr, _, xte, yte = split
    ex = (xtr[:2],)
    result = quantize(teacher, {"method": "dynamic_int8"}, calibration=None, example_inputs=ex)
    q = result.model
    assert size_bytes(q, ex) <= 0.35 * size_bytes(teacher, ex)
    assert accuracy(q, xte, yte) >= accuracy(teacher, xte, yte) - 0.01
    for blob in (torchscript_bytes(q, ex), torchscript_bytes(torch.jit.script(q))):
        assert torch.equal(predict(load_torchscript(blob), xte), predict(q, xte))


def test_onnx_int8_dynamic_is_small_and_accurate(split, teacher, tmp_path):
    xtr, _, xte, yte = split
    fp32 = export_onnx(teacher, tmp_path / "t.onnx", (xtr[:2],))
    q = quantize_onnx(fp32, tmp_path / "t_int8.onnx", "dynamic")
    assert size_bytes(q) <= 0.35 * size_bytes(fp32)
    out = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"input": xte.numpy()})[0]
    acc = float((out.argmax(1) == yte.numpy()).mean())
    assert acc >= accuracy(teacher, xte, yte) - 0.01


def test_onnx_int8_static_qdq_on_cnn_via_quantize(split, cnn, tmp_path):
    xtr, _, xte, yte = split
    xtr, xte = xtr.view(-1, 1, 8, 8), xte.view(-1, 1, 8, 8)
    result = quantize(cnn, {"method": "onnx_int8", "mode": "static"}, calibration=_calibration(xtr),
                      example_inputs=(xtr[:2],), work_dir=tmp_path)
    assert result.model is None and result.path.exists()
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": xte.numpy()})[0]
    assert float((out.argmax(1) == yte.numpy()).mean()) >= accuracy(cnn, xte, yte) - 0.03
    again = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"input": xte.numpy()})[0]
    assert np.array_equal(out.argmax(1), again.argmax(1))


def test_static_int8_fx_on_cnn(split, cnn):
    xtr, _, xte, yte = split
    xtr, xte = xtr.view(-1, 1, 8, 8), xte.view(-1, 1, 8, 8)
    ex = (xtr[:2],)
    result = quantize(cnn, {"method": "static_int8"}, calibration=_calibration(xtr), example_inputs=ex)
    q = result.model
    assert accuracy(q, xte, yte) >= accuracy(cnn, xte, yte) - 0.03
    assert size_bytes(q, ex) < 0.5 * size_bytes(cnn, ex)
    loaded = load_torchscript(torchscript_bytes(q, ex))
    assert torch.equal(predict(loaded, xte), predict(q, xte))


@pytest.mark.parametrize("method", ["fp16", "bf16"])
def test_half_precision_keeps_float32_io(split, teacher, method):
    xtr, _, xte, yte = split
    ex = (xtr[:2],)
    q = quantize(teacher, {"method": method}, calibration=None, example_inputs=ex).model
    out = q(xte[:4])
    assert out.dtype == torch.float32
    assert size_bytes(q, ex) <= 0.55 * size_bytes(teacher, ex)
    assert accuracy(q, xte, yte) >= accuracy(teacher, xte, yte) - 0.01
    loaded = load_torchscript(torchscript_bytes(torch.jit.script(q)))
    assert torch.equal(predict(loaded, xte), predict(q, xte))


def test_qat_trains_through_the_callback(split, cnn):
    xtr, ytr, xte, yte = split
    xtr, xte = xtr.view(-1, 1, 8, 8), xte.view(-1, 1, 8, 8)
    calls = []

    def train_fn(model):
        calls.append(model.training)
        kd_finetune(model, cnn, xtr, ytr, epochs=1, lr=2e-4)

    ex = (xtr[:2],)
    result = quantize(cnn, {"method": "qat", "epochs": 1}, calibration=None, example_inputs=ex, train_fn=train_fn)
    assert calls == [True]
    assert accuracy(result.model, xte, yte) >= accuracy(cnn, xte, yte) - 0.03
    loaded = load_torchscript(torchscript_bytes(result.model, ex))
    assert torch.equal(predict(loaded, xte), predict(result.model, xte))


def test_torchscript_input_is_made_editable(split, teacher):
    ex = (split[0][:2],)
    q = quantize(torch.jit.script(teacher), {"method": "dynamic_int8"}, calibration=None, example_inputs=ex).model
    assert torch.equal(predict(q, split[2]), predict(quantize(teacher, {"method": "dynamic_int8"}, example_inputs=ex).model, split[2]))


def test_bad_configs():
    assert set(quantizers.names()) == {"dynamic_int8", "static_int8", "fp16", "bf16", "onnx_int8", "qat"}
    m = torch.nn.Sequential(torch.nn.Linear(4, 2))
    ex = (torch.randn(2, 4),)
    for cfg, code in (({"method": "int3"}, "invalid_spec"), ({"method": "static_int8"}, "invalid_spec"),
                      ({"method": "qat", "epochs": 0}, "invalid_spec")):
        with pytest.raises(EngineError) as exc:
            quantize(m, cfg, calibration=None, example_inputs=ex)
        assert exc.value.code == code
    with pytest.raises(EngineError, match="train_fn"):
        quantize(m, {"method": "qat"}, example_inputs=ex)
