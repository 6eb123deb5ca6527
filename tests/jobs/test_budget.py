"""Job budgets (app/jobs/budget.py): exact parameter counts against the engine's own modules, the
oversized specs refused through the API with 422 ``budget_exceeded``, ordinary jobs let through."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from app.db.models import Dataset, Model
from app.jobs import budget
from jobspec import JobSpec
from app.settings import Settings
from tests.support.jobs import job_body
from tests.support.students import build_student
from engine.students import derive
from engine.students import architecture, families
from engine.compression.datafree import make_generator
from engine.values import InputInfo, TeacherInfo


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _teacher(num_parameters: int = 1000, out: int | None = 10, fmt: str = "onnx", architecture=None) -> Model:
    outputs = [] if out is None else [{"name": "y", "shape": [None, out], "dtype": "float"}]
    return Model(id="mdl_t", format=fmt, task="classification", architecture=architecture,
                 io_schema={"inputs": [], "outputs": outputs}, num_parameters=num_parameters)


def _dataset(inputs: list[InputInfo], rows: int = 500, val_rows: int | None = None) -> Dataset:
    arrays = {i.name: {"shape": [rows, *i.row_shape], "dtype": "int64" if i.is_integer else "float32"}
              for i in inputs}
    arrays["y"] = {"shape": [rows], "dtype": "int64"}
    if val_rows:
        arrays.update({f"{i.name}_val": {"shape": [val_rows, *i.row_shape], "dtype": arrays[i.name]["dtype"]}
                       for i in inputs})
        arrays["y_val"] = {"shape": [val_rows], "dtype": "int64"}
    return Dataset(id="ds_d", format="npz", num_rows=rows, size_bytes=1000, has_labels=True,
                   schema_={"arrays": arrays, "inputs": [i.name for i in inputs]})


def _estimate(body: dict, teacher: Model, dataset: Dataset | None = None, student_model: Model | None = None,
              settings: Settings | None = None) -> budget.Estimate:
    spec = JobSpec.model_validate({"teacher_model_id": teacher.id,
                                   **({"dataset_id": dataset.id} if dataset is not None else {}), **body})
    return budget.estimate(spec, teacher, {dataset.id: dataset} if dataset is not None else {}, student_model,
                           settings=settings or Settings())


def _student(est: budget.Estimate, step: int = 0) -> int:
    return next(p for label, p in est.models.items() if label.startswith(f"student of step {step}:"))


# ---- golden parameter counts ----------------------------------------------------------------------

IDS = InputInfo("input_ids", (12,), True, 99)
MASK = InputInfo("attention_mask", (12,), True, 1)
FAMILIES = [
    ({"family": "mlp", "hidden": [32, 16]}, [InputInfo("x", (64,))]),
    ({"family": "mlp"}, [InputInfo("x", (8, 8))]),
    ({"family": "mlp", "hidden": [1000, 7], "dropout": 0.5}, [InputInfo("x", (3, 5, 5))]),
    ({"family": "cnn", "channels": [8, 16], "hidden": [32]}, [InputInfo("x", (1, 8, 8))]),
    ({"family": "cnn", "kernel_size": 5}, [InputInfo("x", (8, 8))]),
    ({"family": "cnn", "channels": [4, 4, 4, 4], "kernel_size": 2, "hidden": [9, 5]}, [InputInfo("x", (3, 9, 7))]),
    ({"family": "cnn", "channels": [6], "kernel_size": 4}, [InputInfo("x", (2, 5, 5))]),
    ({"family": "resnet", "depth": 4, "width": 8}, [InputInfo("x", (3, 16, 16))]),
    ({"family": "resnet", "depth": 1, "width": 4}, [InputInfo("x", (8, 8))]),
    ({"family": "resnet", "depth": 7, "width": 5}, [InputInfo("x", (3, 15, 9))]),
    ({"family": "embedding_bag", "hidden": [16], "vocab_size": 100}, [IDS, MASK]),
    ({"family": "embedding_bag", "embedding_dim": 8, "vocab_size": 120}, [IDS]),
    ({"family": "text_transformer", "d_model": 32, "heads": 4, "ff": 64, "vocab_size": 100}, [IDS, MASK]),
    ({"family": "text_transformer", "d_model": 16, "heads": 2, "layers": 1, "ff": 32, "max_len": 20,
      "vocab_size": 300}, [IDS]),
]


@pytest.mark.parametrize("cfg,inputs", FAMILIES, ids=[f"{c['family']}-{i}" for i, (c, _) in enumerate(FAMILIES)])
def test_family_counts_equal_the_engine_module(cfg, inputs):
    model, arch = build_student(cfg).create(inputs, 10, None)
    est = _estimate({"student": cfg}, _teacher(out=10), _dataset(inputs))
    assert _student(est) == _numel(model)
    assert budget.architecture_cost(arch).parameters == _numel(model)  # the engine's own architecture dict too


def test_default_student_configs_match_the_engine():
    """Defaults filled by the API spec (jobspec) must be the ones the engine builds with."""
    for cfg, inputs in [({"family": "mlp"}, [InputInfo("x", (20,))]), ({"family": "cnn"}, [InputInfo("x", (1, 12, 12))]),
                        ({"family": "resnet"}, [InputInfo("x", (3, 8, 8))]),
                        ({"family": "embedding_bag", "vocab_size": 150}, [IDS]),
                        ({"family": "text_transformer", "vocab_size": 100}, [IDS, MASK])]:
        model, _ = build_student(cfg).create(inputs, 4, None)
        assert _student(_estimate({"student": cfg}, _teacher(out=4), _dataset(inputs))) == _numel(model), cfg


TEACHER_ARCHS = [
    ({"family": "mlp", "in_features": 64, "hidden": [256, 128, 64], "out_features": 10}, [InputInfo("x", (64,))]),
    ({"family": "mlp", "in_features": 30, "hidden": [100, 90, 80, 70, 60], "out_features": 3},
     [InputInfo("x", (30,))]),
    ({"family": "cnn", "input_shape": [3, 16, 16], "channels": [32, 64, 64], "hidden": [128, 64],
      "out_features": 10}, [InputInfo("x", (3, 16, 16))]),
    ({"family": "resnet", "input_shape": [3, 16, 16], "depth": 9, "width": 24, "out_features": 10},
     [InputInfo("x", (3, 16, 16))]),
    ({"family": "embedding_bag", "vocab_size": 100, "embedding_dim": 48, "hidden": [64, 32], "out_features": 5},
     [IDS]),
    ({"family": "text_transformer", "vocab_size": 100, "d_model": 64, "layers": 4, "heads": 4, "ff": 256,
      "max_len": 16, "out_features": 5}, [IDS, MASK]),
]
RATIOS = [{"width": 0.5}, {"width": 0.3, "depth": 0.5}, {"width": 1.0, "depth": 0.34}, {"width": 0.05, "depth": 0.2}]


@pytest.mark.parametrize("ratios", RATIOS, ids=lambda r: f"w{r['width']}-d{r.get('depth', 1.0)}")
@pytest.mark.parametrize("arch,inputs", TEACHER_ARCHS, ids=[a["family"] for a, _ in TEACHER_ARCHS])
def test_derive_of_a_builtin_teacher_equals_the_engine_module(arch, inputs, ratios):
    teacher_module = architecture.from_architecture(arch)
    out = arch["out_features"]
    model, derived = derive.build({"derive": ratios}).create(inputs, out, TeacherInfo(None, arch, "safetensors"))
    teacher = _teacher(_numel(teacher_module), out=out, fmt="safetensors", architecture=arch)
    est = _estimate({"student": {"derive": ratios}}, teacher, _dataset(inputs))
    assert _student(est) == _numel(model)
    assert est.models["teacher mdl_t (safetensors)"] == _numel(teacher_module)
    mirrored = budget.derive_architecture(arch, ratios["width"], ratios.get("depth", 1.0), out)
    assert mirrored == {k: v for k, v in derived.items() if k != "derived_from"}


@pytest.mark.parametrize("widths,ratios", [([256, 256], {"width": 0.5}), ([512, 512, 512], {"width": 0.25}),
                                           ([300, 200, 100], {"width": 0.5, "depth": 0.5}),
                                           ([256, 256], {"width": 0.5, "depth": 0.5})])
def test_derive_of_a_layer_chain_is_sized_within_2x(widths, ratios):
    """A TorchScript chain's layers are not known before the job runs: teacher · width² · depth, roughly."""
    dims = [64, *widths, 10]
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    chain = torch.jit.script(nn.Sequential(*layers[:-1]))
    model, arch = derive.build({"derive": ratios}).create([InputInfo("x", (64,))], 10,
                                                     TeacherInfo(chain, None, "torchscript"))
    assert arch["family"] == "sequential"
    est = _estimate({"student": {"derive": ratios}}, _teacher(_numel(chain), out=None, fmt="torchscript"),
                    _dataset([InputInfo("x", (64,))]))
    assert 0.5 <= _student(est) / _numel(model) <= 2


@pytest.mark.parametrize("cfg,k", [({"family": "mlp", "hidden": [32]}, 16), ({"family": "mlp", "hidden": [8, 8]}, 3),
                                   ({"family": "mlp"}, 64)])
def test_input_reduction_equals_the_engine_module(cfg, k):
    inner, _ = build_student(cfg).create([InputInfo("x", (k,))], 10, None)
    model = architecture.ReducedInput(64, k, inner)
    est = _estimate({"student": cfg, "steps": [{"kind": "distill", "input_reduction": {"components": k}}]},
                    _teacher(out=10), _dataset([InputInfo("x", (64,))]))
    assert _student(est) == _numel(model)


def test_input_reduction_of_a_derived_student_is_sized():
    arch = {"family": "mlp", "in_features": 64, "hidden": [64], "out_features": 10}
    teacher = _teacher(_numel(architecture.from_architecture(arch)), fmt="safetensors", architecture=arch)
    est = _estimate({"student": {"derive": {"width": 0.5}},
                     "steps": [{"kind": "distill", "input_reduction": {"components": 8}}]},
                    teacher, _dataset([InputInfo("x", (64,))]))
    derived = 64 * 32 + 32 + 32 * 10 + 10
    assert _student(est) == derived + 64 * 8 + 8


@pytest.mark.parametrize("shape,latent", [((64,), 64), ((1000,), 16), ((3, 32, 32), 64), ((1, 8, 8), 8),
                                          ((3, 10, 10), 32), ((2, 6), 4)])
def test_generator_equals_the_engine_generator(shape, latent):
    assert budget.generator_cost(list(shape), latent).parameters == _numel(make_generator(latent, shape, 0.0, 1.0))


def test_uploaded_student_and_no_student():
    uploaded = Model(id="mdl_s", format="torchscript", task="classification", architecture=None, io_schema={},
                     num_parameters=1234)
    est = _estimate({"student": {"model_id": "mdl_s"}}, _teacher(), _dataset([InputInfo("x", (64,))]), uploaded)
    assert _student(est) == 1234
    est = _estimate({"steps": [{"kind": "prune"}]}, _teacher(5000, fmt="torchscript"),
                    _dataset([InputInfo("x", (64,))]))
    assert _student(est) == 5000 and est.parameters == 5000


# ---- the attack specs, through the API --------------------------------------------------------------


def _refused(r, resource: str) -> dict:
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "budget_exceeded", problem
    assert problem["errors"][0]["resource"] == resource, problem
    return problem


def test_huge_mlp_is_refused_naming_parameters(client, make_key, uploaded):
    h = make_key("budget-params")
    m, d = uploaded(h)
    r = client.post("/v1/jobs", headers=h, json=job_body(m, d, student={"family": "mlp", "hidden": [65536] * 32}))
    problem = _refused(r, "parameters")
    expected = 64 * 65536 + 65536 + 31 * (65536 * 65536 + 65536) + 65536 * 10 + 10  # the ONNX teacher has 10 outputs
    first = problem["errors"][0]
    assert first["estimate"] == expected and first["limit"] == 1_000_000_000
    assert first["setting"] == "DISTILLERY_MAX_JOB_PARAMETERS" and first["loc"] == ["body", "student"]
    assert "133.2 G parameters" in problem["detail"] and "allows 1.0 G parameters" in problem["detail"]
    assert "DISTILLERY_MAX_JOB_PARAMETERS" in problem["detail"]
    assert client.get("/v1/jobs", headers=h).json()["data"] == []  # nothing was queued


def test_huge_data_free_synthesis_is_refused_naming_memory(client, make_key, uploaded):
    h = make_key("budget-memory")
    m, _ = uploaded(h, "torchscript")  # synthesize needs a torch teacher
    r = client.post("/v1/jobs", headers=h, json={
        "teacher_model_id": m, "input_spec": {"shape": [1_000_000]}, "student": {"family": "mlp", "hidden": [32]},
        "steps": [{"kind": "distill", "epochs": 1, "synthesize": {"num_samples": 10_000_000}}]})
    problem = _refused(r, "memory_bytes")
    memory = problem["errors"][0]
    assert memory["estimate"] >= 10_000_000 * 1_000_000 * 4 and memory["limit"] == 16 * 1024**3
    assert memory["setting"] == "DISTILLERY_MAX_JOB_MEMORY_BYTES"
    assert "of memory" in problem["detail"] and "synthetic" in problem["detail"]
    assert "allows 16.0 GiB" in problem["detail"] and "DISTILLERY_MAX_JOB_MEMORY_BYTES" in problem["detail"]
    assert "parameters" not in {e["resource"] for e in problem["errors"]}


def test_too_many_epochs_are_refused_naming_seconds(client, make_key, uploaded):
    h = make_key("budget-seconds")
    m, d = uploaded(h)
    r = client.post("/v1/jobs", headers=h, json=job_body(m, d, student={"family": "mlp", "hidden": [4096] * 8},
                                                         steps=[{"kind": "distill", "epochs": 10_000}]))
    problem = _refused(r, "seconds")
    assert [e["resource"] for e in problem["errors"]] == ["seconds"]
    err = problem["errors"][0]
    assert err["estimate"] > 6 * 3600 and err["limit"] == 6 * 3600 and err["setting"] == "DISTILLERY_MAX_JOB_SECONDS"
    assert "seconds" in problem["detail"] and "DISTILLERY_MAX_JOB_SECONDS" in problem["detail"]
    # The same student for a few epochs fits.
    ok = client.post("/v1/jobs", headers=h, json=job_body(m, d, student={"family": "mlp", "hidden": [4096] * 8}))
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize("setting,tiny,large,resource", [
    ("max_job_parameters", 50_000, 1_000_000, "parameters"),  # the digits teacher has 85,002
    ("max_job_memory_bytes", 100_000, 1 << 30, "memory_bytes"),
    ("max_job_seconds", 1, 1_000_000, "seconds"),
])
def test_each_limit_is_configurable(client, make_key, uploaded, monkeypatch, setting, tiny, large, resource):
    from app.settings import get_settings

    h = make_key(f"budget-{resource}")
    m, d = uploaded(h)
    if resource == "seconds":
        monkeypatch.setattr(get_settings(), "budget_flops_per_second", 1e6)
    monkeypatch.setattr(get_settings(), setting, tiny)
    problem = _refused(client.post("/v1/jobs", headers=h, json=job_body(m, d)), resource)
    assert problem["errors"][0]["limit"] == tiny
    monkeypatch.setattr(get_settings(), setting, large)
    assert client.post("/v1/jobs", headers=h, json=job_body(m, d)).status_code == 202


# ---- ordinary jobs are not refused ------------------------------------------------------------------


def _ordinary_bodies(m: str, d: str, d2: str) -> dict[str, dict]:
    example = {**JobSpec.model_config["json_schema_extra"]["examples"][0], "teacher_model_id": m, "dataset_id": d}
    return {
        "spec example": example,
        "job_body": job_body(m, d),
        "defaults": {"teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp", "hidden": [32]}},
        "default mlp": {"teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp"}},
        "two datasets": {"teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp", "hidden": [32]},
                         "steps": [{"kind": "distill", "dataset_id": d2, "loss": {"type": "kd"}, "epochs": 20,
                                    "optimizer": {"type": "adamw", "lr": 0.01}},
                                   {"kind": "distill", "loss": {"type": "kd", "alpha": 0.5}, "epochs": 20}]},
        "baseline": {"teacher_model_id": m, "dataset_id": d, "baseline": True, "student": {"family": "mlp"},
                     "steps": [{"kind": "distill", "epochs": 20, "early_stopping": {"patience": 3}}]},
        "distill prune quantize": {
            "teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp", "hidden": [64]},
            "steps": [{"kind": "distill", "epochs": 30, "optimizer": {"type": "adamw", "lr": 0.01}},
                      {"kind": "prune", "method": "magnitude", "amount": 0.5, "finetune": {"epochs": 2},
                       "iterations": 3},
                      {"kind": "quantize", "method": "static_int8"}]},
        "augment coreset reduction": {
            "teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp", "hidden": [64]},
            "steps": [{"kind": "distill", "epochs": 50, "augment": {"noise": 0.1, "mixup": 0.2},
                       "coreset": {"method": "kmeans", "fraction": 0.5},
                       "input_reduction": {"method": "pca", "components": 16}}]},
        "data-free": {"teacher_model_id": m, "eval_dataset_id": d, "input_spec": {"shape": [64], "range": [0, 1]},
                      "student": {"family": "mlp", "hidden": [32]},
                      "steps": [{"kind": "distill", "epochs": 20, "synthesize": {"method": "generator",
                                                                              "num_samples": 4000,
                                                                              "generator_epochs": 20}}]},
        "derive": {"teacher_model_id": m, "dataset_id": d, "student": {"derive": {"width": 0.5}}},
        "no student": {"teacher_model_id": m, "dataset_id": d, "steps": [
            {"kind": "prune", "amount": 0.3, "finetune": {"epochs": 3}}, {"kind": "quantize", "method": "fp16"}]},
    }


def test_ordinary_jobs_fit_the_default_budget(client, make_key, uploaded, digits):
    """The spec example and the bodies the API and integration tests submit, on the real registered rows."""
    from app.db.session import session_scope
    from app.jobs.service import check_compatible
    from tests.support.teachers import npz_bytes

    h = make_key("budget-ordinary")
    d2 = client.post("/v1/datasets", headers=h, files={"file": ("u.npz", npz_bytes(x=digits.x_train[:800]))},
                     data={"name": "unlabeled", "format": "npz"}).json()["id"]
    defaults = Settings()
    for fmt in ("onnx", "torchscript"):
        m, d = uploaded(h, fmt)
        with session_scope() as s:
            teacher = s.get(Model, m)
            rows = {ds_id: s.get(Dataset, ds_id) for ds_id in (d, d2)}
            for why, body in _ordinary_bodies(m, d, d2).items():
                spec = JobSpec.model_validate(body)
                if fmt == "onnx" and why in ("data-free", "no student"):
                    continue  # refused by check_compatible (a torch teacher is needed), not by the budget
                check_compatible(spec, teacher, {i: rows[i] for i in spec.dataset_ids()})
                est = budget.check(budget.estimate(spec, teacher, rows, settings=defaults), defaults)
                assert est.models[f"teacher {m} ({fmt})"] == 85_002, (fmt, why)  # the digits teacher, registered
                assert est.parameters == max(est.models.values()) < 200_000, (fmt, why, est.models)
                assert 0 < est.memory_bytes < 64 * 1024**2 and 0 < est.seconds < 60, (fmt, why, est)
                reduced = any(step.get("input_reduction") for step in body.get("steps", []))
                if (body.get("student") or {}).get("family") == "mlp" and not reduced:
                    hidden = body["student"].get("hidden", [128])
                    real = _numel(families.build_mlp({"in_features": 64, "hidden": hidden, "out_features": 10}))
                    assert 0.5 <= _student(est) / real <= 2, (fmt, why, _student(est), real)
                    if fmt == "onnx":
                        assert _student(est) == real, why  # ONNX declares its 10 outputs: exact


def test_estimate_of_the_spec_example_is_exact_where_it_can_be():
    inputs = [InputInfo("x", (64,))]
    example = {k: v for k, v in JobSpec.model_config["json_schema_extra"]["examples"][0].items()
               if k not in ("teacher_model_id", "dataset_id")}
    est = _estimate(example, _teacher(85_002), _dataset(inputs, rows=1437, val_rows=360))
    assert _student(est) == 64 * 64 + 64 + 64 * 10 + 10
    # 20 epochs over 1437 rows of a 4.8 K-parameter student: a fraction of a second at 2e10 FLOP/s.
    assert 0 < est.seconds < 1 and est.memory_bytes < 2 * 1024**2
    assert math.isclose(est.seconds, est.flops / Settings().budget_flops_per_second)
