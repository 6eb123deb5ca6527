"""ONNX export of tiny Hugging Face causal LMs (Llama, Qwen2, GPT-2): dynamic axes, onnxruntime matches torch at the
unmasked positions with padding, a corrupted file is caught, the model is left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from engine.errors import ExportFailed
from engine.lm import onnx_export as ox
from tests.support import lm

ARCHS = ("llama", "qwen2", "gpt2")
#: the export example per architecture: Llama's is one token, the size a trace specialises on (transformers' single-query
#: GQA path), so its graph only generalises because export_onnx widens the example
EXAMPLES = {"llama": (1, 1), "qwen2": (2, 8), "gpt2": (3, 5)}


@pytest.fixture(scope="module")
def tok():
    return lm.tokenizer()


def small(tok, arch: str, **sizes):
    return lm.build_model(tok, arch, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, **sizes)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """arch -> (model, example_ids, path, facts), each exported once into its own folder."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for arch in ARCHS:
        model = small(tok, arch).eval()
        ids = torch.randint(3, len(tok), EXAMPLES[arch], generator=g)
        path = tmp_path_factory.mktemp(arch) / "model.onnx"
        out[arch] = (model, ids, path, ox.export_onnx(model, path, example_ids=ids))
    return out


def _ort_logits(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_exports_with_dynamic_axes_and_matches_torch_with_padding(exported, tok, arch):
    model, ids, path, facts = exported[arch]
    assert facts["exporter"] == "torchscript" and facts["opset"] == 17
    assert facts["bytes"] == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # weights inside, no external data files
    io = [("input_ids", "int64", ["batch", "sequence"]), ("attention_mask", "int64", ["batch", "sequence"])]
    assert [(i["name"], i["dtype"], i["shape"]) for i in facts["inputs"]] == io
    assert facts["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", len(tok)]}]
    # the file itself: symbolic (named) batch and sequence dims, not the example's sizes
    graph = onnx.load(str(path)).graph
    for v in [*graph.input, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[:2]] == ["batch", "sequence"] and not any(d.dim_value for d in dims[:2])

    report = ox.verify_onnx(path, model, ids)
    assert report["max_abs_diff"] < 1e-4
    b, t = ids.shape
    assert report["shapes_checked"][0] == [b, t]
    assert any(rb != b and rt != t for rb, rt in report["shapes_checked"])  # another batch size and length

    # independently of verify_onnx: another batch size and length, left padding in row 0, right padding in row 2
    x = torch.randint(3, len(tok), (4, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    mask[2, -4:] = 0
    x[mask == 0] = tok.pad_token_id
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask, use_cache=False).logits.numpy()
    got = _ort_logits(path, x, mask)
    keep = mask.bool().numpy()
    assert got.shape == want.shape == (4, 13, len(tok))
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=1e-4)


def test_a_corrupted_weight_fails_verification(exported, tmp_path):
    model, ids, path, _ = exported["qwen2"]
    proto = onnx.load(str(path))
    weight = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: len(t.raw_data))
    array = numpy_helper.to_array(weight).copy()
    array.flat[: array.size // 10] += 0.5  # a tenth of the largest matrix (embedding or head) shifted
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ExportFailed, match=r"max abs diff \d") as info:
        ox.verify_onnx(broken, model, ids)
    assert info.value.code == "export_failed"

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(ExportFailed, match="cannot load"):
        ox.verify_onnx(garbage, model, ids)


def test_export_leaves_the_model_unchanged(tok, tmp_path):
    # GPT-2 has dropout: in training mode its outputs are random, so export and verification must run in eval mode
    # and hand the model back in training mode, with a submodule the caller froze in eval still in eval.
    model = small(tok, "gpt2").train()
    model.transformer.h[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, len(tok), (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model.eval()(ids).logits
    model.train()
    model.transformer.h[0].eval()

    ox.export_onnx(model, tmp_path / "m.onnx", example_ids=ids)
    ox.verify_onnx(tmp_path / "m.onnx", model, ids)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, before)


def test_refuses_a_model_over_the_size_limit_or_not_float32(tok, tmp_path, monkeypatch):
    model = lm.build_model(tok, "llama", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    ids = torch.randint(3, len(tok), (2, 4))
    with pytest.raises(ExportFailed, match="bfloat16"):
        ox.export_onnx(model.to(torch.bfloat16), tmp_path / "half.onnx", example_ids=ids)
    model.float()
    monkeypatch.setattr(ox, "MAX_BYTES", 100_000)
    with pytest.raises(ExportFailed, match="limited to 2 GiB"):
        ox.export_onnx(model, tmp_path / "big.onnx", example_ids=ids)
    with pytest.raises(ExportFailed, match="integer tensor"):
        ox.export_onnx(model, tmp_path / "bad.onnx", example_ids=torch.zeros(4))
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_the_dynamo_exporter(tok, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("tracer says no")

    model = lm.build_model(tok, "gpt2", layers=1, hidden=32, heads=2, intermediate=64)
    ids = torch.randint(3, len(tok), (2, 4))
    monkeypatch.setattr(ox, "EXPORTERS", (("torchscript", broken), ("dynamo", ox._export_dynamo)))
    facts = ox.export_onnx(model, tmp_path / "m.onnx", example_ids=ids)
    assert facts["exporter"] == "dynamo"
    assert facts["inputs"][0]["shape"] == ["batch", "sequence"]
    assert ox.verify_onnx(tmp_path / "m.onnx", model, ids)["max_abs_diff"] < 1e-4

    monkeypatch.setattr(ox, "EXPORTERS", (("torchscript", broken), ("dynamo", broken)))
    with pytest.raises(ExportFailed, match="torchscript: RuntimeError: tracer says no; dynamo: RuntimeError"):
        ox.export_onnx(model, tmp_path / "n.onnx", example_ids=ids)
    assert not (tmp_path / "n.onnx").exists()
