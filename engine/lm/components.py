"""The generative-LM components, registered like every other engine component (:mod:`engine.registry`).

* loss ``token_kd`` (config :class:`jobspec.TokenKDLoss`): :meth:`TokenKD.targets` turns teacher logits into the
  cached targets, calling the loss gives ``(loss, parts)`` (:mod:`.divergence`);
* student family ``hf_causal_lm`` (config :class:`jobspec.students.HFCausalLMStudent`): a fresh model of the
  teacher's architecture (:func:`.students.fresh_student`);
* teacher format ``hf_transformers`` (:mod:`.model_dir`) and dataset format ``jsonl`` (:mod:`.text_data`);
* exports ``hf`` and ``gguf`` (and the LM flavour of ``onnx``, :data:`LM_EXPORTERS`): each writes the student's
  files and verifies them before they are delivered.

Nothing here imports transformers at import time: ``engine.registries`` loads this module for every job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import jobspec
from engine.lm import divergence
from engine.errors import Unsupported
from engine.registry import dataset_formats, exports, losses, steps, students, teacher_formats
from engine.values import ArtifactFile

ZIP = "application/zip"
BINARY = "application/octet-stream"


@losses.register("token_kd")
class TokenKD:
    """(1 − w)·T²·D(p_teacher, p_student) + w·CE over the target tokens (see :class:`jobspec.TokenKDLoss`)."""

    Config = jobspec.TokenKDLoss

    def __init__(self, config: jobspec.TokenKDLoss):
        self.config = config

    def targets(self, teacher_logits: torch.Tensor) -> torch.Tensor | divergence.TopK:
        """[B, T, V] teacher logits → what is cached: log-probs at the temperature, or the top-k + tail."""
        return divergence.teacher_targets(teacher_logits, self.config.temperature, self.config.top_k)

    def __call__(self, student_logits: torch.Tensor, teacher: torch.Tensor | divergence.TopK, labels: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        return divergence.token_kd_loss(student_logits, teacher, labels, mask, divergence=c.divergence, beta=c.beta,
                                        temperature=c.temperature, sft_weight=c.sft_weight)


@steps.register("generate")
class Generate:
    """The teacher writes completions for prompts (:func:`engine.lm.generation.generate_records`); run by the LM
    pipeline, which hands the records to the following distill steps."""

    Config = jobspec.GenerateStep
    epochs = 0
    method = "generate"

    def __init__(self, config: jobspec.GenerateStep):
        self.config = config

    def run(self, ctx: Any, index: int) -> None:
        raise Unsupported("generate steps need a causal_lm teacher")


@students.register("hf_causal_lm")
class HFCausalLM:
    """A fresh causal LM of the teacher's architecture and vocabulary, sized by ``config``."""

    Config = jobspec.students.HFCausalLMStudent

    def __init__(self, config: jobspec.students.HFCausalLMStudent):
        self.config = config

    def create_lm(self, teacher: Any) -> Any:
        from engine.lm.students import fresh_student

        return fresh_student(teacher.config, dict(self.config.config))


@teacher_formats.register("hf_transformers")
class HFTransformersFormat:
    """A zipped Hugging Face model directory: unpacked, checked, loaded (:mod:`.model_dir`)."""

    @staticmethod
    def load(path: Path, dest: Path) -> tuple[Any, Any]:
        from engine.lm import model_dir

        directory = model_dir.unpack(Path(path), dest)
        return model_dir.load_causal_lm(directory), model_dir.load_tokenizer(directory)


@dataset_formats.register("jsonl")
class JsonlFormat:
    """Text records, one JSON object per line (:mod:`.text_data`)."""

    @staticmethod
    def read(path: Path) -> tuple[str, list[dict]]:
        from engine.lm.text_data import read_records

        return read_records(Path(path))


class LMExport:
    """Write the student's files into ``out_dir`` and verify them; returns their :class:`ArtifactFile` s (step
    ``step_index``). ``example`` [B, L] token ids to compare outputs on; ``work`` a scratch directory."""

    def write_lm(self, model: Any, tok: Any, example: torch.Tensor, out_dir: Path, work: Path, step_index: int
                 ) -> tuple[list[ArtifactFile], dict[str, Any]]:
        raise NotImplementedError


@exports.register("hf")
class HFExport(LMExport):
    """``student-hf.zip``: ``save_pretrained`` (safetensors) + the tokenizer, loadable by ``from_pretrained`` and
    ``pipeline("text-generation")`` (both checked)."""

    def write_lm(self, model, tok, example, out_dir, work, step_index):
        from engine.lm import hf_export

        path = out_dir / "student-hf.zip"
        hf_export.export_hf(model, tok, path)
        return [ArtifactFile("student", "hf", path, step_index, ZIP)], hf_export.verify_hf(path, model, example)


@exports.register("gguf")
class GGUFExport(LMExport):
    """``student-f16.gguf`` and ``student-q8_0.gguf`` for llama.cpp / Ollama, each read back and checked."""

    def write_lm(self, model, tok, example, out_dir, work, step_index):
        from engine.lm import gguf_export

        directory = work / "student-hf"
        if not (directory / "config.json").exists():
            model.save_pretrained(directory, safe_serialization=True)
            tok.save_pretrained(directory)
        files, checks = [], {}
        for dtype in ("f16", "q8_0"):
            path = out_dir / f"student-{dtype}.gguf"
            gguf_export.write_gguf(directory, path, dtype=dtype)
            checks[dtype] = gguf_export.verify_gguf(path, directory)
            files.append(ArtifactFile("student", "gguf", path, step_index, BINARY))
        return files, checks


class LMOnnxExport(LMExport):
    """``student.onnx``: the decoder's forward (input_ids, attention_mask → logits), checked in onnxruntime."""

    def write_lm(self, model, tok, example, out_dir, work, step_index):
        from engine.lm import onnx_export

        path = out_dir / "student.onnx"
        onnx_export.export_onnx(model, path, example_ids=example)
        return [ArtifactFile("student", "onnx", path, step_index, BINARY)], onnx_export.verify_onnx(path, model,
                                                                                                   example)


#: The exports of a causal LM by spec name (``onnx`` is registered for fixed-shape models; this is its LM flavour).
LM_EXPORTERS: dict[str, type[LMExport]] = {"hf": HFExport, "gguf": GGUFExport, "onnx": LMOnnxExport}
