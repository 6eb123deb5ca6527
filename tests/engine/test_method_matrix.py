"""The method matrix of the distillation issue, each trained on real data with a quality floor:
losses on digits, residual and transformer students, derived students, init from the teacher."""

from __future__ import annotations

import pytest
import torch

from engine import DatasetSource
from engine import TeacherSource
from engine import run

from .helpers import RecordingReporter, make_spec


def _run(spec, teacher, data, tmp_path):
    return run(spec, teacher, data, tmp_path / "out", RecordingReporter(), device="cpu", threads=1)


@pytest.mark.slow  # trains a whole job to an accuracy floor
@pytest.mark.parametrize("loss", [
    {"type": "soft_ce", "temperature": 2.0, "entropy_weight": 0.1},
    {"type": "hard", "label_smoothing": 0.0},
    {"type": "mse", "target": "outputs"},
])
def test_losses_reach_088_on_digits_with_mlp32(teacher_ts, digits_npz, tmp_path, loss):
    spec = make_spec(step__loss=loss, step__epochs=25)
    result = _run(spec, teacher_ts, digits_npz, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.88, (loss, result.metrics)


@pytest.fixture(scope="module")
def image_teacher(teacher_module, tmp_path_factory, digits):
    """The digits teacher behind a Flatten, so it takes 1×8×8 images; and the images as an npz."""
    import numpy as np

    x, y = digits
    path = tmp_path_factory.mktemp("img") / "teacher.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), teacher_module).eval()), str(path))
    npz = path.parent / "images.npz"
    np.savez(npz, x=x.reshape(-1, 1, 8, 8), y=y)
    return TeacherSource(path, "torchscript"), DatasetSource(npz)


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_resnet_student_on_digit_images(image_teacher, tmp_path):
    teacher, data = image_teacher
    spec = make_spec(exports=["torchscript"], student={"family": "resnet", "depth": 3, "width": 8},
                     step__epochs=8, step__batch_size=64)
    result = _run(spec, teacher, data, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.85, result.metrics


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_text_transformer_student_on_token_embeddings(token_data, tmp_path):
    teacher, data = token_data
    spec = make_spec(step__loss={"type": "cosine", "mse_weight": 0.0}, step__epochs=25,
                     step__batch_size=64,
                     student={"family": "text_transformer", "d_model": 32, "layers": 1, "heads": 4, "ff": 64})
    result = _run(spec, teacher, data, tmp_path)
    assert result.metrics["student"]["cosine"] >= 0.8, result.metrics


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_embedding_bag_with_init_from_teacher_reaches_cosine_08(token_data, tmp_path):
    teacher, data = token_data
    spec = make_spec(step__loss={"type": "cosine", "mse_weight": 0.0}, step__epochs=20,
                     step__batch_size=64, student={"family": "embedding_bag", "hidden": [64], "init": "teacher"})
    result = _run(spec, teacher, data, tmp_path)
    assert result.metrics["student"]["cosine"] >= 0.8, result.metrics
    copied = result.report["architecture"]["init_from_teacher"]
    assert any("emb" in name for name in copied), copied  # the token-embedding table came from the teacher


def test_derived_student_is_smaller_and_learns(teacher_ts, digits_npz, tmp_path):
    spec = make_spec(exports=["torchscript"], student={"derive": {"width": 0.25, "depth": 0.5}, "init": "teacher"},
                     step__epochs=15)
    result = _run(spec, teacher_ts, digits_npz, tmp_path)
    assert result.report["student"]["num_parameters"] < result.report["teacher"]["num_parameters"] / 4
    assert result.metrics["student"]["accuracy"] >= 0.88, result.metrics
