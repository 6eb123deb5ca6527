"""Teacher formats, dataset formats and the three tasks, each trained end to end on real data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes

from engine import DatasetSource
from engine import EngineError
from engine import TeacherSource
from engine import run

from .helpers import RecordingReporter, make_spec

pytestmark = pytest.mark.slow  # a whole job per data format and task, held to accuracy floors

FAST = {"step__epochs": 20}


def _run(spec, teacher, data, tmp_path, **kw):
    return run(spec, teacher, data, tmp_path / "out", RecordingReporter(), device="cpu", threads=1, **kw)


# ---- teacher formats ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_pt2(teacher_module, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "teacher.pt2"
    ep = torch.export.export(teacher_module, (torch.zeros(4, 64),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, str(path))
    return TeacherSource(path, "torch_export")


def test_torch_export_teacher_distils_digits(teacher_pt2, digits_npz, tmp_path):
    result = _run(make_spec(**FAST), teacher_pt2, digits_npz, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.9
    assert result.report["teacher"]["num_parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def _rewrite_pt2(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            data = edit(info.filename, data)
            zout.writestr(info, data)


@pytest.mark.parametrize("how", ["use_pickle", "expr", "target", "aoti"])
def test_torch_export_archives_that_would_unpickle_or_eval_are_refused(teacher_pt2, digits_npz, tmp_path, how):
    from engine.inspection.pt2 import safe_load_exported

    bad = tmp_path / "bad.pt2"

    def edit(name, data):
        if how == "use_pickle" and name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["use_pickle"] = True
            return json.dumps(cfg).encode()
        if how == "expr" and name.endswith("models/model.json"):
            return data.replace(b"Symbol('s", b"__import__('os').system('s", 1) if b"Symbol('s" in data else \
                data.replace(b'"expr_str": "', b'"expr_str": "__import__(1) + ', 1)
        if how == "target" and name.endswith("models/model.json"):
            return data.replace(b"torch.ops.aten.relu.default", b"torch.os.system", 1)
        return data

    _rewrite_pt2(teacher_pt2.path, bad, edit)
    if how == "aoti":
        with zipfile.ZipFile(bad, "a") as z:
            root = z.namelist()[0].split("/")[0]
            z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(EngineError) as err:
        safe_load_exported(bad)
    assert err.value.code == "invalid_model" and "refusing" in err.value.message


def test_safetensors_teacher_with_architecture(teacher_module, digits_npz, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher_module.state_dict().items()}, str(path))
    # built-in mlp layout: Flatten at index 0, so the keys shift by one
    arch = {"family": "mlp", "in_features": 64, "hidden": [256, 256], "out_features": 10}
    from engine.students.architecture import from_architecture

    keys = list(from_architecture(arch).state_dict())
    state = dict(zip(keys, [v.contiguous() for v in teacher_module.state_dict().values()]))
    save_file(state, str(path))
    result = _run(make_spec(**FAST), TeacherSource(path, "safetensors", architecture=arch), digits_npz, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.9

    wrong = {**arch, "hidden": [256]}
    with pytest.raises(EngineError) as err:
        _run(make_spec(**FAST), TeacherSource(path, "safetensors", architecture=wrong), digits_npz, tmp_path)
    assert err.value.code == "invalid_model" and "unexpected keys" in err.value.message


# ---- regression (diabetes), csv + parquet -------------------------------------------------------


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    d = load_diabetes()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32)
    y = ((d.target - d.target.mean()) / d.target.std()).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-3)
    xt, yt = torch.from_numpy(x[:380]), torch.from_numpy(y[:380])
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(xt).squeeze(1), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    base = tmp_path_factory.mktemp("diabetes")
    path = base / "teacher.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    return x, y, TeacherSource(path, "torchscript", task="regression"), base


def _regression_spec():
    return make_spec(step__loss={"type": "mse", "target": "outputs"}, step__epochs=60, step__batch_size=32,
                     student={"family": "mlp", "hidden": [32]}, exports=["onnx", "torchscript"])


def test_regression_csv(diabetes, tmp_path):
    x, y, teacher, base = diabetes
    path = base / "diabetes.csv"
    cols = [f"f{i}" for i in range(10)]
    lines = [",".join(cols + ["target"])] + [",".join(f"{v:.6f}" for v in row) + f",{t:.6f}" for row, t in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    result = _run(_regression_spec(), teacher, DatasetSource(path, "csv", options={"label_column": "target"}), tmp_path)
    s = result.metrics["student"]
    assert set(s) >= {"mse", "mae", "r2", "teacher_r2", "agreement_mse"}
    assert s["teacher_r2"] >= 0.8, s
    assert s["r2"] >= 0.3, s
    assert result.report["teacher"]["r2"] >= 0.3


def test_regression_parquet_and_bad_column(diabetes, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y, teacher, base = diabetes
    table = pa.table({**{f"f{i}": x[:, i] for i in range(10)}, "target": y})
    path = tmp_path / "d.parquet"
    pq.write_table(table, str(path))
    result = _run(_regression_spec(), teacher, DatasetSource(path, "parquet", options={"label_column": "target"}),
                  tmp_path)
    assert result.metrics["student"]["teacher_r2"] >= 0.8

    bad = tmp_path / "bad.parquet"
    pq.write_table(table.append_column("city", pa.array(["x"] * len(y))), str(bad))
    with pytest.raises(EngineError) as err:
        _run(_regression_spec(), teacher, DatasetSource(bad, "parquet", options={"label_column": "target"}), tmp_path)
    assert err.value.code == "invalid_dataset" and "'city'" in err.value.message


# ---- embedding: a two-input transformer teacher on token sequences -----------------------------


def test_embedding_two_input_teacher_with_cosine(token_data, tmp_path):
    teacher, data = token_data
    spec = make_spec(step__loss={"type": "cosine", "mse_weight": 0.0}, step__epochs=30, step__batch_size=64,
                     student={"family": "embedding_bag", "hidden": [64], "embedding_dim": 32},
                     exports=["onnx", "torchscript"])
    result = _run(spec, teacher, data, tmp_path)
    assert result.metrics["student"]["cosine"] >= 0.9, result.metrics
    onnx_file = next(a.path for a in result.artifacts if a.format == "onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][:1] == ["input_ids"]

    with pytest.raises(EngineError) as err:
        _run(make_spec(exports=["onnx"], student={"family": "embedding_bag"}), teacher, data, tmp_path)
    assert err.value.code == "invalid_spec" and "'kd' does not apply to an embedding teacher" in err.value.message


# ---- dataset formats ----------------------------------------------------------------------------


def test_pt_dataset_and_multi_array_npz_val(digits, teacher_ts, tmp_path):
    x, y = digits
    path = tmp_path / "digits.pt"
    torch.save({"x": torch.from_numpy(x[:1500]), "y": torch.from_numpy(y[:1500]),
                "x_val": torch.from_numpy(x[1500:]), "y_val": torch.from_numpy(y[1500:])}, str(path))
    result = _run(make_spec(**FAST), teacher_ts, DatasetSource(path, "pt"), tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.9
    assert result.report["data"]["val_source"] == "x_val" and result.report["data"]["val_rows"] == len(x) - 1500


def test_large_npz_is_memory_mapped_and_cache_spills_to_disk(digits, teacher_ts, tmp_path, monkeypatch):
    from engine.data import loading as data_loading
    from engine.data import npz as npz_format
    from engine.training import tables as train_tables

    monkeypatch.setattr(npz_format, "NPZ_MMAP_THRESHOLD", 1)
    monkeypatch.setattr(train_tables, "CACHE_MEMORY_LIMIT", 1)
    x, y = digits
    path = tmp_path / "big.npz"
    np.savez(path, x=x, y=y)
    reporter = RecordingReporter()
    result = run(make_spec(**FAST), teacher_ts, {"ds_test": DatasetSource(path)}, tmp_path / "out", reporter,
                 device="cpu", threads=1)
    assert result.metrics["student"]["accuracy"] >= 0.9
    assert list((tmp_path / "out" / "cache").glob("npz-*/x.npy"))
    assert any(e[0] == "teacher_outputs" and (e[3] or {}).get("on_disk") for e in reporter.events)
    ds = data_loading.load_dataset(DatasetSource(path), tmp_path / "c2")
    assert isinstance(ds.x["x"], np.memmap)


@pytest.fixture(scope="module")
def image_zip(digits, tmp_path_factory):
    from PIL import Image

    x, y = digits
    path = tmp_path_factory.mktemp("img") / "digits.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, (img, label) in enumerate(zip(x, y)):
            buf = io.BytesIO()
            Image.fromarray((img.reshape(8, 8) * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
            z.writestr(f"digits/class_{label}/{i:04d}.png", buf.getvalue())
    return path


def test_image_folder_zip(image_zip, teacher_module, tmp_path):
    teacher = torch.nn.Sequential(torch.nn.Flatten(), teacher_module).eval()
    path = tmp_path / "img_teacher.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(teacher), str(path))
    data = DatasetSource(image_zip, "image_folder", options={"image_size": [8, 8], "grayscale": True})
    spec = make_spec(**FAST, student={"family": "cnn", "channels": [16], "kernel_size": 3, "hidden": [], "dropout": 0.0})
    result = _run(spec, TeacherSource(path, "torchscript"), data, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.85
    assert result.report["data"]["classes"] == [f"class_{i}" for i in range(10)]
    assert result.report["data"]["input_shape"] == [1, 8, 8]


def _inspect_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "engine.inspection.dataset", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_inspect_data_cli(image_zip, digits_npz, token_data, tmp_path):
    rc, out = _inspect_cli("--format", "image_folder", "--options", '{"image_size": [8, 8], "grayscale": true}', image_zip)
    assert rc == 0 and out["ok"] and out["num_rows"] == 1797 and out["has_labels"]
    assert out["schema"]["classes"][0] == "class_0" and out["schema"]["arrays"]["x"]["shape"] == [1797, 1, 8, 8]
    rc, out = _inspect_cli("--format", "npz", digits_npz.path)
    assert rc == 0 and out["schema"]["arrays"]["x"] == {"shape": [1797, 64], "dtype": "float32"}
    rc, out = _inspect_cli("--format", "npz", "--inputs", "input_ids,attention_mask", token_data[1].path)
    assert rc == 0 and out["schema"]["inputs"] == ["input_ids", "attention_mask"] and not out["has_labels"]
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n1,x,0\n2,y,1\n")
    rc, out = _inspect_cli("--format", "csv", "--options", '{"label_column": "label"}', csv)
    assert rc == 2 and not out["ok"] and "'b'" in out["error"]
    rc, out = _inspect_cli("--format", "npz", "--inputs", "nope", digits_npz.path)
    assert rc == 2 and "no array 'nope'" in out["error"]
