"""The compression steps' work inside a job: ``prune``, ``quantize`` and ``input_reduction``.

Each function works on :class:`.train.TrainContext` and may REPLACE ``ctx.student`` /
``ctx.architecture``. What a step did and how to export its output are left in
``ctx.step_outputs[index]`` (a :class:`StepOutput`) for the pipeline:

* ``details``: merged into the step's report row (``prune`` stats, ``quantization`` notes,
  ``input_reduction``);
* ``export``: keyword overrides for :class:`.export.ExportInput` (tolerance, skipped formats, the
  ONNX plan for torch-quantized models, the safetensors source for fp16/bf16).

Fine-tuning (prune ``finetune``, ``qat``) is the shared :func:`.train.fit` loop distilling from the
job's ORIGINAL teacher on the job's dataset (cached teacher outputs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.values import InputInfo
from engine.errors import EngineError


@dataclass
class StepOutput:
    details: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)


def _out(ctx: Any, index: int) -> StepOutput:
    if index not in ctx.step_outputs:
        ctx.step_outputs[index] = StepOutput()
    return ctx.step_outputs[index]


# ---------------------------------------------------------------------------------------------
# models that only run on CPU


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime behind the ``nn.Module`` call interface (CPU, inference only).

    ``feed_names``: the session's input names in the data's input order.
    """

    cpu_only = True

    def __init__(self, path: Path, feed_names: list[str] | None = None, threads: int | None = None):
        super().__init__()
        from engine.export.formats import ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads or torch.get_num_threads())
        names = [i.name for i in self.session.get_inputs()]
        self.feed_names = list(feed_names) if feed_names else names
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(self.feed_names, xs)}
        return torch.from_numpy(np.asarray(self.session.run([self.output_name], feeds)[0], dtype=np.float32))

    def counts(self) -> tuple[int, int]:
        """(weights, non-zero weights): initializers with more than one element (scales and zero
        points are not counted)."""
        import onnx
        from onnx import numpy_helper

        total = nonzero = 0
        for init in onnx.load(str(self.path), load_external_data=False).graph.initializer:
            n = int(math.prod(init.dims))
            if n <= 1:
                continue
            total += n
            nonzero += int(np.count_nonzero(numpy_helper.to_array(init)))
        return total, nonzero


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), including the packed weights of quantized modules
    (counted from their int8 values) and ONNX initializers for :class:`OrtModule`."""
    if isinstance(model, OrtModule):
        return model.counts()
    total = nonzero = 0
    for m in model.modules():
        for name in ("weight", "bias"):
            attr = getattr(type(m), name, None)
            if attr is None or not callable(getattr(m, name, None)) or isinstance(getattr(m, name), torch.Tensor):
                continue
            try:
                t = getattr(m, name)()
            except Exception:  # noqa: BLE001 - not a quantized module's accessor
                continue
            if not isinstance(t, torch.Tensor):
                continue
            values = t.int_repr() if t.is_quantized else t
            total += t.numel()
            nonzero += int(torch.count_nonzero(values))
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return int(total), int(nonzero)


class _CpuOnly:
    """Marks a (quantized) module as CPU-only for evaluation (attribute on the instance)."""

    @staticmethod
    def mark(model: nn.Module) -> nn.Module:
        model.cpu_only = True  # type: ignore[attr-defined]
        return model


# ---------------------------------------------------------------------------------------------
# data helpers


def _example(ctx: Any, rows: int = 2) -> list[torch.Tensor]:
    return list(ctx.val.slice(0, min(rows, ctx.val.n)))


def _record_data(ctx: Any, index: int, info: dict[str, Any]) -> None:
    ctx.step_info.setdefault(index, {}).update(info)


def _calibration(ctx: Any, step: Any, index: int, rows: int, batch: int = 32) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """``rows`` seeded random rows of the job's training data, as CPU batches of ``batch``."""
    data = ctx.step_data(step, index, [])
    n = data.table.n
    k = max(1, min(rows, n))
    g = torch.Generator().manual_seed(ctx.seed + 31 * (index + 1))
    idx = torch.sort(torch.randperm(n, generator=g)[:k]).values
    xs = [t.detach().cpu() for t in data.table.take(idx)]
    _record_data(ctx, index, {**data.info, "calibration_rows": int(k)})
    return [tuple(x[i:i + batch] for x in xs) for i in range(0, k, batch)], int(k)


# ---------------------------------------------------------------------------------------------
# prune


def run_prune(ctx: Any, step: Any, index: int) -> None:
    from engine.compression import pruning as P
    from engine.training.loop import fit

    model = ctx.student
    if getattr(model, "cpu_only", False):
        raise EngineError("invalid_spec", f"steps[{index}]: a quantized model cannot be pruned")
    cfg = step.pruner_config()
    method = cfg["method"]
    example = tuple(_example(ctx))
    importance = None
    if method == "layer":
        data = ctx.step_data(step, index, [])
        importance = tuple(data.table.slice(0, min(512, data.table.n)))
        _record_data(ctx, index, data.info)
    # random pruning draws from torch's global RNG: seed it from the job
    torch.manual_seed(ctx.seed + 7919 * (index + 1))
    ft = step.finetune
    rounds: list[dict[str, Any]] = []
    result = None
    was_training = model.training
    model.eval()
    try:
        for result in P.prune_steps(model, cfg, example_inputs=example, importance_data=importance):
            work = result.model.to(ctx.device)
            for p in work.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
            if isinstance(getattr(ctx.student, "reduce", None), nn.Linear) and hasattr(work, "reduce"):
                work.reduce.requires_grad_(False)  # the folded input reduction stays fixed
            ctx.student = work
            k = int(result.stats["iteration"])
            entry: dict[str, Any] = {"iteration": k, "sparsity": result.stats["sparsity"],
                                     "parameter_ratio": result.stats["parameter_ratio"]}
            pruned_metrics = ctx.evaluate()
            entry["after_pruning"] = pruned_metrics
            ctx.reporter.event("prune", f"step {index}: {method} round {k}/{cfg['iterations']}: sparsity "
                               f"{result.stats['sparsity']:.3f}, parameters x{result.stats['parameter_ratio']:.3f}",
                               data={"step": index, **entry})
            if ft is not None:
                masks = P.zero_masks(work) if method != "channel" else None
                fit(ctx, ft, index, after_step=(lambda m, _masks=masks: P.reapply_masks(m, _masks)) if masks else None,
                    epoch_offset=(k - 1) * ft.config.epochs, total_epochs=step.epochs)
                entry["after_finetune"] = ctx.evaluate()
            rounds.append(entry)
    finally:
        model.train(was_training)
    assert result is not None
    work = ctx.student
    work.eval()
    if method == "channel":
        ctx.architecture = _architecture_of(work, ctx.architecture)
    stats = {k: v for k, v in P._stats((result.stats["parameters_before"], result.stats["nonzero_before"]), work).items()}
    if "layer_amounts" in result.stats:
        stats["layer_amounts"] = result.stats["layer_amounts"]
    details = {"method": method, "amount": cfg["amount"], "iterations": cfg["iterations"], **stats, "rounds": rounds}
    if method == "magnitude":
        details["scope"] = cfg["scope"]
    if ft is not None:
        details["finetune"] = ft.describe()
    _out(ctx, index).details["prune"] = details


def _architecture_of(model: nn.Module, previous: dict[str, Any]) -> dict[str, Any]:
    """The architecture dict of a structurally pruned model: a plain ``sequential`` chain when it is
    one, else marked so safetensors exports fall back to the module itself."""
    from engine.students import derive

    if isinstance(model, nn.Sequential):
        try:
            arch = derive.chain_architecture(model)
            if previous.get("input_shape"):
                arch["input_shape"] = previous["input_shape"]
            arch["pruned_from"] = previous.get("family")
            return arch
        except EngineError:
            pass
    return {"family": "pruned", "pruned_from": previous.get("family")}


# ---------------------------------------------------------------------------------------------
# quantize


def run_quantize(ctx: Any, step: Any, index: int) -> None:
    from engine.compression import quantization as Q

    method = step.config.method
    model = ctx.student
    cpu = torch.device("cpu")
    example = [e.detach().cpu() for e in _example(ctx)]
    out = _out(ctx, index)
    info: dict[str, Any] = {"method": method}

    if isinstance(model, OrtModule):
        if method != "onnx_int8":
            raise EngineError("unsupported", f"steps[{index}] (quantize {method}) needs a torch model, but the model "
                              "is ONNX; only method 'onnx_int8' works on an ONNX model")
        _onnx_int8(ctx, step, index, model.path, model.feed_names, out, info)
        return
    if getattr(model, "cpu_only", False):
        raise EngineError("invalid_spec", f"steps[{index}]: the model is already quantized")
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
        raise EngineError("unsupported", f"steps[{index}] (quantize {method}) needs a model with one float input; "
                          f"this one takes {len(example)} input(s) ({', '.join(str(e.dtype) for e in example)}); "
                          "use dynamic_int8 or onnx_int8")

    if method == "dynamic_int8":
        res = Q.quantize(float_model, {"method": "dynamic_int8"}, example_inputs=example)
        q = res.model
        out.export = {"tolerance": "int8", "skip": {"safetensors": "int8 weights are packed; safetensors holds "
                                                    "float tensors (export the step before quantize instead)"},
                      "onnx_plan": {"float_model": float_model, "mode": "dynamic",
                                    "note": "ONNX exported from the float model before quantization, then quantized "
                                            "by ONNX Runtime (dynamic int8 weights, QInt8)"}}
    elif method == "static_int8":
        batches, rows = _calibration(ctx, step, index, step.config.calibration_rows)
        res = Q.quantize(float_model, {"method": "static_int8", "calibration_batches": len(batches)},
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
        batches, rows = _calibration(ctx, step, index, step.config.calibration_rows)
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
        res = Q.quantize(float_model, {"method": method}, example_inputs=example)
        q = res.model
        cast_back = copy.deepcopy(q.inner).float().eval()
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        out.export = {"tolerance": "half", "safetensors_model": cast_back, "safetensors_dtype": dtype,
                      "onnx_plan": {"float_model": cast_back, "mode": None,
                                    "note": f"ONNX holds the {method} weights cast back to float32 (same values, "
                                            "float32 compute)"}}
    else:  # pragma: no cover - the registry's Literal rejects others
        raise EngineError("invalid_spec", f"steps[{index}]: unknown quantize method {method!r}")

    _CpuOnly.mark(q)
    q.eval()
    info["notes"] = res.format_notes if res is not None else (
        "int8 after quantization-aware training (FX, x86 engine); saves with torch.jit.trace")
    if method in ("static_int8", "qat"):
        info["notes"] += f"; quantized engine {torch.backends.quantized.engine}"
    info["cpu_note"] = _CPU_NOTES[method]
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


_CPU_NOTES = {
    "dynamic_int8": "int8 GEMMs on CPU (fbgemm/x86); on GPU run the float model instead",
    "static_int8": "CPU only (x86/fbgemm engine): set torch.backends.quantized.engine = 'x86' before loading",
    "qat": "CPU only (x86/fbgemm engine): set torch.backends.quantized.engine = 'x86' before loading",
    "onnx_int8": "run with ONNX Runtime's CPU execution provider",
    "fp16": "half the size; on most CPUs slower than float32 (no native fp16 GEMM); fast on GPU",
    "bf16": "half the size; fast only on CPUs with AVX512-BF16/AMX and on GPU",
}


def _onnx_int8(ctx: Any, step: Any, index: int, src: Path, feed_names: list[str], out: StepOutput,
               info: dict[str, Any]) -> None:
    from engine.compression.quantization import quantize_onnx

    work = ctx.work_dir / f"step{index}"
    work.mkdir(parents=True, exist_ok=True)
    dst = work / "int8.onnx"
    mode = step.config.mode
    feeds = None
    if mode == "static":
        batches, rows = _calibration(ctx, step, index, step.config.calibration_rows)
        feeds = [{n: x.numpy() for n, x in zip(feed_names, b)} for b in batches]
        info["calibration_rows"] = rows
    try:
        quantize_onnx(src, dst, mode, feeds)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        from engine.errors import error_summary

        raise EngineError("unsupported", f"steps[{index}] (quantize onnx_int8): ONNX Runtime cannot quantize this "
                          f"model: {error_summary(exc)}") from None
    model = OrtModule(dst, feed_names)
    ctx.student = model
    info["mode"] = mode
    info["notes"] = f"ONNX Runtime int8 ({mode}{', QDQ' if mode == 'static' else ''}); the step's output is an ONNX model"
    info["cpu_note"] = _CPU_NOTES["onnx_int8"]
    out.details["quantization"] = info
    out.export = {"tolerance": "float", "onnx_plan": {"file": dst},
                  "skip": {"torchscript": "the output of onnx_int8 is an ONNX model",
                           "safetensors": "the output of onnx_int8 is an ONNX model"}}


def _qat(ctx: Any, step: Any, index: int, float_model: nn.Module, example: list[torch.Tensor]
         ) -> tuple[nn.Module, nn.Module | None]:
    """prepare_qat_fx -> KD fine-tuning with fake quantization (fit) -> convert_fx.

    Returns the int8 model and, when the prepared model's float weights map back onto the original
    modules one to one (no conv-bn fusion), a float copy holding the QAT-trained weights."""
    from engine.compression import quantization as Q
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

    res = Q.quantize(float_model, {"method": "qat", "epochs": ft.config.epochs}, example_inputs=example,
                     train_fn=train_fn)
    trained = copy.deepcopy(float_model)
    own = trained.state_dict()
    got = {k: v for k, v in holder["state"].items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    float_copy: nn.Module | None = None
    if set(got) == set(own):
        trained.load_state_dict(got)
        float_copy = trained.eval()
    return res.model, float_copy


# ---------------------------------------------------------------------------------------------
# input reduction (distill steps)


def _f_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One-way ANOVA F statistic of every column of ``x`` against class labels ``y``."""
    classes = np.unique(y)
    n, k = x.shape[0], len(classes)
    if k < 2:
        return np.zeros(x.shape[1])
    mean = x.mean(0)
    between = np.zeros(x.shape[1])
    within = np.zeros(x.shape[1])
    for c in classes:
        xc = x[y == c]
        mc = xc.mean(0)
        between += len(xc) * (mc - mean) ** 2
        within += ((xc - mc) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (between / (k - 1)) / (within / max(1, n - k))
    f = np.where(np.isfinite(f), f, np.where(between > 0, np.inf, 0.0))
    return f


def apply_input_reduction(ctx: Any, step: Any, index: int) -> None:
    """Fit PCA / select_k_best on the step's transfer set and REPLACE the student by a fresh one of the
    job's family built for ``k`` inputs, behind a fixed first layer taking the original features."""
    from engine.students.families import ReducedInput

    cfg = step.input_reduction
    if ctx.make_student is None:
        raise EngineError("invalid_spec", f"steps[{index}].input_reduction needs a student family")
    data = ctx.step_data(step, index, list(dict.fromkeys(h.teacher for h in step.hints)))
    table = data.table
    if len(table.names) != 1 or table.float_inputs() != [0]:
        raise EngineError("invalid_spec", f"steps[{index}].input_reduction works on one float (tabular/vector) input; "
                          f"the data has inputs {table.names}")
    name = table.names[0]
    x = np.asarray(table.arrays[name][:], dtype=np.float64).reshape(table.n, -1)
    d = x.shape[1]
    k = cfg.components
    if k > d:
        raise EngineError("invalid_spec", f"steps[{index}].input_reduction.components: {k} is more than the "
                          f"{d} input features")
    weight = np.zeros((k, d))
    bias = np.zeros(k)
    details: dict[str, Any] = {"method": cfg.method, "components": k, "in_features": d, "fitted_on_rows": table.n}
    if cfg.method == "pca":
        mean = x.mean(0)
        xt = torch.from_numpy(x - mean)
        _, s, vh = torch.linalg.svd(xt, full_matrices=False)
        comps = vh[:k].numpy()
        weight = comps
        bias = -comps @ mean
        var = (s.numpy() ** 2)
        details["explained_variance_ratio"] = round(float(var[:k].sum() / var.sum()), 6) if var.sum() > 0 else 0.0
    else:
        if data.labels is not None and ctx.task == "classification":
            y = data.labels.cpu().numpy()
            details["scored_against"] = "labels"
        elif data.cache is not None and ctx.task == "classification":
            y = data.cache.all_outputs().argmax(1).cpu().numpy()
            details["scored_against"] = "teacher_argmax"
        else:
            raise EngineError("invalid_spec", f"steps[{index}].input_reduction select_k_best needs class labels or a "
                              "classification teacher")
        scores = _f_scores(x, y)
        chosen = np.sort(np.argsort(-scores, kind="stable")[:k])
        weight[np.arange(k), chosen] = 1.0
        details["selected"] = [int(i) for i in chosen]
    row_shape = tuple(int(s) for s in np.asarray(table.arrays[name][:1]).shape[1:])
    inner, inner_arch = ctx.make_student([InputInfo(name, (k,), False, None)])
    model = ReducedInput(d, k, inner)
    with torch.no_grad():
        model.reduce.weight.copy_(torch.from_numpy(weight).float())
        model.reduce.bias.copy_(torch.from_numpy(bias).float())
    ctx.student = model.to(ctx.device)
    ctx.architecture = {"family": "input_reduction", "method": cfg.method, "in_features": d,
                        "input_shape": list(row_shape), "components": k, "student": inner_arch}
    ctx.reporter.event("input_reduction", f"step {index}: {cfg.method} {d} -> {k} features, folded into the "
                       "student as a fixed first layer", data={"step": index, **{k2: v for k2, v in details.items()
                                                                                    if k2 != "selected"}})
    _out(ctx, index).details["input_reduction"] = details
