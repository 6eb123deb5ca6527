"""The ``quantize`` step's driver: ``dynamic_int8``, ``static_int8``, ``qat``, ``fp16`` / ``bf16``
(:mod:`engine.compression.quantization`) and ``onnx_int8`` (ONNX Runtime).

``run_quantize(ctx, step, index)`` replaces ``ctx.student`` by the quantized model (CPU only; an
:class:`~engine.steps.compress.OrtModule` for ``onnx_int8``) and leaves the notes in
``details["quantization"]`` and the export plan (tolerance, skipped formats, how to produce ONNX) in
``export`` of ``step_output(ctx, index)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import EngineError, InvalidSpec, Unsupported
from engine.devices import is_cpu_only, mark_cpu_only
from engine.steps.compress import OrtModule, calibration_batches, example_inputs
from engine.training.context import StepOutput, step_output


def run_quantize(ctx: Any, step: Any, index: int) -> None:
    """Quantize ``ctx.student`` with ``step.config.method``; see the module docstring."""
    from engine.compression import quantization

    method = step.config.method
    model = ctx.student
    cpu = torch.device("cpu")
    example = [e.detach().cpu() for e in example_inputs(ctx)]
    out = step_output(ctx, index)
    info: dict[str, Any] = {"method": method}

    if isinstance(model, OrtModule):
        if method != "onnx_int8":
            raise Unsupported(f"steps[{index}] (quantize {method}) needs a torch model, but the model "
                              "is ONNX; only method 'onnx_int8' works on an ONNX model")
        _onnx_int8(ctx, step, index, model.path, model.feed_names, out, info)
        return
    if is_cpu_only(model):
        raise InvalidSpec(f"steps[{index}]: the model is already quantized")
    float_model = copy.deepcopy(model).to(cpu).eval()
    single_float = len(example) == 1 and example[0].is_floating_point()
    if single_float:
        _plain_flatten(float_model)

    if method == "onnx_int8":
        from engine.export.formats import export_onnx_file

        work = ctx.work_dir / f"step{index}"
        work.mkdir(parents=True, exist_ok=True)
        names = list(ctx.val.names)
        src = export_onnx_file(float_model, work / "float.onnx", example, names,
                               "logits" if ctx.task == "classification" else "output")
        _onnx_int8(ctx, step, index, src, names, out, info)
        return

    if method in ("static_int8", "qat", "fp16", "bf16") and not single_float:
        raise Unsupported(f"steps[{index}] (quantize {method}) needs a model with one float input; "
                          f"this one takes {len(example)} input(s) ({', '.join(str(e.dtype) for e in example)}); "
                          "use dynamic_int8 or onnx_int8")

    if method == "dynamic_int8":
        res = quantization.quantize(float_model, {"method": "dynamic_int8"}, example_inputs=example)
        q = res.model
        out.export = {"tolerance": "int8", "skip": {"safetensors": "int8 weights are packed; safetensors holds "
                                                    "float tensors (export the step before quantize instead)"},
                      "onnx_plan": {"float_model": float_model, "mode": "dynamic",
                                    "note": "ONNX exported from the float model before quantization, then quantized "
                                            "by ONNX Runtime (dynamic int8 weights, QInt8)"}}
    elif method == "static_int8":
        batches, rows = calibration_batches(ctx, step, index, step.config.calibration_rows)
        res = quantization.quantize(float_model, {"method": "static_int8", "calibration_batches": len(batches)},
                         calibration=batches, example_inputs=example)
        q = res.model
        info["calibration_rows"] = rows
        out.export = {"tolerance": "int8", "skip": {"safetensors": "int8 weights are packed; safetensors holds "
                                                    "float tensors (export the step before quantize instead)"},
                      "onnx_plan": {"float_model": float_model, "mode": "static",
                                    "calibration": [{ctx.val.names[0]: b[0].numpy()} for b in batches],
                                    "note": f"ONNX exported from the float model before quantization, then quantized "
                                            f"by ONNX Runtime (static QDQ, calibrated on the same {rows} rows)"}}
    elif method == "qat":
        q, prepared_float = _qat(ctx, step, index, float_model, example)
        batches, rows = calibration_batches(ctx, step, index, step.config.calibration_rows)
        info["finetune"] = step.finetune.describe()
        skip = {"safetensors": "int8 weights are packed; safetensors holds float tensors"}
        plan = None
        if prepared_float is not None:
            plan = {"float_model": prepared_float, "mode": "static",
                    "calibration": [{ctx.val.names[0]: b[0].numpy()} for b in batches],
                    "note": f"ONNX exported from the QAT-trained float weights, then quantized by ONNX Runtime "
                            f"(static QDQ, calibrated on {rows} training rows)"}
        else:
            skip["onnx"] = ("the QAT model fuses layers whose float weights cannot be mapped back to the original "
                            "modules; ONNX export is not available for it")
        out.export = {"tolerance": "int8", "skip": skip, "onnx_plan": plan}
        res = None
    elif method in ("fp16", "bf16"):
        res = quantization.quantize(float_model, {"method": method}, example_inputs=example)
        q = res.model
        cast_back = copy.deepcopy(q.inner).float().eval()
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        out.export = {"tolerance": "half", "safetensors_model": cast_back, "safetensors_dtype": dtype,
                      "onnx_plan": {"float_model": cast_back, "mode": None,
                                    "note": f"ONNX holds the {method} weights cast back to float32 (same values, "
                                            "float32 compute)"}}
    else:  # pragma: no cover - the registry's Literal rejects others
        raise InvalidSpec(f"steps[{index}]: unknown quantize method {method!r}")

    mark_cpu_only(q)
    q.eval()
    info["notes"] = res.format_notes if res is not None else (
        "int8 after quantization-aware training (FX, x86 engine); saves with torch.jit.trace")
    if method in ("static_int8", "qat"):
        info["notes"] += f"; quantized engine {torch.backends.quantized.engine}"
    info["cpu_note"] = CPU_NOTES[method]
    ctx.student = q
    out.details["quantization"] = info


def _plain_flatten(model: nn.Module) -> None:
    """Swap the students' ``FloatFlatten`` (an integer-input cast: control flow FX cannot trace) for
    ``nn.Flatten``, in place; the model's input is float here."""
    from engine.students.families import FloatFlatten

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FloatFlatten):
                setattr(parent, name, nn.Flatten(child.start_dim, child.end_dim))


CPU_NOTES = {
    "dynamic_int8": "int8 GEMMs on CPU (fbgemm/x86); on GPU run the float model instead",
    "static_int8": "CPU only (x86/fbgemm engine): set torch.backends.quantized.engine = 'x86' before loading",
    "qat": "CPU only (x86/fbgemm engine): set torch.backends.quantized.engine = 'x86' before loading",
    "onnx_int8": "run with ONNX Runtime's CPU execution provider",
    "fp16": "half the size; on most CPUs slower than float32 (no native fp16 GEMM); fast on GPU",
    "bf16": "half the size; fast only on CPUs with AVX512-BF16/AMX and on GPU",
}


def _onnx_int8(ctx: Any, step: Any, index: int, src: Path, feed_names: list[str], out: StepOutput,
               info: dict[str, Any]) -> None:
    from engine.compression.onnx_quantization import quantize_onnx

    work = ctx.work_dir / f"step{index}"
    work.mkdir(parents=True, exist_ok=True)
    dst = work / "int8.onnx"
    mode = step.config.mode
    feeds = None
    if mode == "static":
        batches, rows = calibration_batches(ctx, step, index, step.config.calibration_rows)
        feeds = [{n: x.numpy() for n, x in zip(feed_names, b)} for b in batches]
        info["calibration_rows"] = rows
    try:
        quantize_onnx(src, dst, mode, feeds)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        from engine.errors import error_summary

        raise Unsupported(f"steps[{index}] (quantize onnx_int8): ONNX Runtime cannot quantize this "
                          f"model: {error_summary(exc)}") from None
    model = OrtModule(dst, feed_names)
    ctx.student = model
    info["mode"] = mode
    info["notes"] = f"ONNX Runtime int8 ({mode}{', QDQ' if mode == 'static' else ''}); the step's output is an ONNX model"
    info["cpu_note"] = CPU_NOTES["onnx_int8"]
    out.details["quantization"] = info
    out.export = {"tolerance": "float", "onnx_plan": {"file": dst},
                  "skip": {"torchscript": "the output of onnx_int8 is an ONNX model",
                           "safetensors": "the output of onnx_int8 is an ONNX model"}}


def _qat(ctx: Any, step: Any, index: int, float_model: nn.Module, example: list[torch.Tensor]
         ) -> tuple[nn.Module, nn.Module | None]:
    """prepare_qat_fx -> KD fine-tuning with fake quantization (fit) -> convert_fx.

    Returns the int8 model and, when the prepared model's float weights map back onto the original
    modules one to one (no conv-bn fusion), a float copy holding the QAT-trained weights."""
    from engine.compression import quantization
    from engine.training.loop import fit

    ft = step.finetune
    holder: dict[str, nn.Module] = {}

    def train_fn(prepared: nn.Module) -> None:
        holder["prepared"] = prepared
        saved = ctx.student
        ctx.student = prepared.to(ctx.device)
        try:
            fit(ctx, ft, index, total_epochs=step.epochs)
        finally:
            ctx.student = saved
        prepared.cpu()
        # convert_fx rewrites the prepared model: keep its trained float weights now
        holder["state"] = {k: v.detach().clone() for k, v in prepared.state_dict().items()}

    res = quantization.quantize(float_model, {"method": "qat", "epochs": ft.config.epochs}, example_inputs=example,
                     train_fn=train_fn)
    trained = copy.deepcopy(float_model)
    own = trained.state_dict()
    got = {k: v for k, v in holder["state"].items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    float_copy: nn.Module | None = None
    if set(got) == set(own):
        trained.load_state_dict(got)
        float_copy = trained.eval()
    return res.model, float_copy
