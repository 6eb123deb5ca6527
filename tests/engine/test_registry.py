"""Registries: lookup, strict typed configs, spec parsing errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine import EngineError
from engine import registries
from engine.registry import Registry, check
from engine.pipeline.spec import parse_spec

from .helpers import make_spec


def test_public_registries_hold_builtins():
    assert set(registries) == {"losses", "students", "optimizers", "steps", "teacher_formats", "dataset_formats", "exports"}
    assert registries["losses"].names() == ["cosine", "hard", "kd", "mse", "soft_ce"]
    assert "mlp" in registries["students"].names()
    assert registries["optimizers"].names() == ["adam", "adamw", "sgd"]
    assert registries["steps"].names() == ["distill", "prune", "quantize"]
    assert registries["teacher_formats"].names() == ["onnx", "safetensors", "torch_export", "torchscript"]
    assert registries["dataset_formats"].names() == ["csv", "image_folder", "npz", "parquet", "pt"]
    assert registries["exports"].names() == ["onnx", "safetensors", "torchscript"]


def test_build_gives_typed_config_with_defaults_and_coercion():
    loss = registries["losses"].build({"type": "kd", "temperature": 2})  # JSON int -> float
    assert loss.config.temperature == 2.0 and isinstance(loss.config.temperature, float)
    assert loss.config.alpha == 0.9
    student = registries["students"].build({"family": "mlp", "hidden": [16, 8.0]})
    assert student.config.hidden == [16, 8] and student.config.activation == "relu"


@pytest.mark.parametrize(
    "registry,config,fragment",
    [
        ("losses", {"type": "kd", "temprature": 2.0}, "unknown key 'temprature' for loss 'kd' (allowed: alpha, temperature)"),
        ("losses", {"type": "kdd"}, "unknown loss 'kdd'; available: cosine, hard, kd"),
        ("losses", {"temperature": 2.0}, "missing key 'type'"),
        ("losses", {"type": "kd", "temperature": 0}, "temperature must be > 0"),
        ("losses", {"type": "kd", "alpha": 1.5}, "alpha must be between 0 and 1"),
        ("losses", {"type": "kd", "alpha": "high"}, "alpha: expected a number, got string"),
        ("losses", {"type": "kd", "alpha": True}, "alpha: expected a number, got boolean"),
        ("students", {"family": "mlp", "activation": "swish"}, "activation: must be one of 'relu', 'gelu', 'tanh'"),
        ("students", {"family": "mlp", "hidden": [32, 1.5]}, "hidden[1]: expected an integer, got 1.5"),
        ("students", {"family": "mlp", "hidden": 32}, "hidden: expected an array"),
        ("students", {"family": "cnnn"}, "unknown student family 'cnnn'"),
        ("optimizers", {"type": "adamw", "lr": -1}, "lr must be > 0"),
        ("optimizers", {"type": "rmsprop"}, "available: adam, adamw, sgd"),
        ("steps", {"kind": "distill", "epochs": 0}, "epochs must be >= 1"),
        ("steps", {"kind": "squeeze"}, "unknown step kind 'squeeze'"),
        ("steps", {"kind": "prune", "amount": 1.0}, "amount must be in (0, 1)"),
        ("steps", "distill", "expected an object, got string"),
    ],
)
def test_build_rejects_bad_configs(registry, config, fragment):
    with pytest.raises(EngineError) as err:
        registries[registry].build(config, where="here")
    assert err.value.code == "invalid_spec"
    assert fragment in err.value.message
    assert err.value.message.startswith("here")


def test_nested_step_config_errors_name_the_full_path():
    with pytest.raises(EngineError) as err:
        parse_spec(make_spec(step__loss={"type": "kd", "temp": 1.0}))
    assert err.value.code == "invalid_spec"
    assert err.value.message.startswith("steps[0].loss: unknown key 'temp'")
    with pytest.raises(EngineError) as err:
        parse_spec(make_spec(step__optimizer={"type": "sgd", "nesterov": True}))
    assert err.value.message.startswith("steps[0].optimizer: unknown key 'nesterov'")
    with pytest.raises(EngineError) as err:
        parse_spec(make_spec(step__shuffle=True))
    assert "steps[0]: unknown key 'shuffle' for step kind 'distill'" in err.value.message


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"steps": []}, "steps: expected a non-empty array"),
        ({"exports": ["torchscript", "tflite"]}, "exports[1]: unknown export format 'tflite'"),
        ({"val_fraction": 1.0}, "val_fraction: must be in [0, 1)"),
        ({"seed": -1}, "seed: expected an integer"),
        ({"seed": "0"}, "seed: expected an integer"),
    ],
)
def test_parse_spec_rejects_bad_top_level_values(overrides, fragment):
    with pytest.raises(EngineError) as err:
        parse_spec(make_spec(**overrides))
    assert err.value.code == "invalid_spec"
    assert fragment in err.value.message


def test_parse_spec_accepts_the_api_shape_and_ignores_api_only_keys():
    job = parse_spec(make_spec(exports=["onnx", "onnx"], metadata={"owner": "x"}))
    assert job.exports == ["onnx"]
    assert job.steps[0].method == "kd" and job.steps[0].epochs == 25
    assert job.seed == 0 and job.val_fraction == 0.1


def test_a_new_plugin_is_one_decorated_class():
    reg: Registry = Registry("widget", key="type")

    @reg.register("big_widget")
    class BigWidget:
        @dataclass(frozen=True)
        class Config:
            size: int = 3

            def __post_init__(self):
                check(self.size > 0, "size must be positive")

        def __init__(self, config):
            self.config = config

    assert reg.names() == ["big_widget"]
    assert reg.get("big_widget") is BigWidget
    assert reg.build({"type": "big_widget", "size": 5}).config.size == 5
    with pytest.raises(EngineError, match="size must be positive"):
        reg.build({"type": "big_widget", "size": 0})
    with pytest.raises(EngineError) as err:
        reg.get("small_widget")
    assert err.value.code == "invalid_spec"
    with pytest.raises(ValueError):
        reg.register("BigWidget")
