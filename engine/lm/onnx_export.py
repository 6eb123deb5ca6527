"""ONNX export of a Hugging Face causal LM's decoder forward, verified in onnxruntime.

The exported graph is the model's full forward pass without a KV cache (``use_cache=False``: every call runs the
whole sequence):

* inputs: ``input_ids`` int64 ``[batch, sequence]`` and ``attention_mask`` int64 ``[batch, sequence]``
  (1 = token, 0 = padding; left or right padding both work);
* output: ``logits`` float32 ``[batch, sequence, vocab]``.

``batch`` and ``sequence`` are dynamic (named dims in the file). Positions are ``0 .. sequence-1`` exactly as in
``model(input_ids=..., attention_mask=...)`` with no ``position_ids``, so the graph returns what that call returns;
logits at padded positions are unspecified. The weights are stored inside the one ``.onnx`` file (no external data
files), which caps the model at 2 GiB (protobuf's limit).

:func:`export_onnx` writes the file; :func:`verify_onnx` runs it in onnxruntime (CPU) on the example and on other
batch/sequence sizes with padding, against the torch model. Failures are :class:`engine.errors.ExportFailed`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import ExportFailed, error_summary

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
#: dim names of the dynamic axes in the file
BATCH, SEQUENCE = "batch", "sequence"
#: protobuf cannot serialise a message over 2 GiB, and the weights must stay inside the one file
MAX_BYTES = 2 * 1024**3
#: the TorchScript exporter's default here, as in engine/export/formats.py (its maximum is 20)
DEFAULT_OPSET = 17


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the exporters need tensors in and one tensor out, not HF's
    ``ModelOutput`` with a cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.logits


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the export/reference run, every submodule's own flag restored afterwards (a
    model in training stays in training, including any submodule a caller froze in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters: TracerWarnings and the deprecation notice (warnings), the dynamo exporter's
    "torchvision is not installed" and progress lines (``torch.onnx`` / ``torch.export`` loggers and prints)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, tied weights (GPT-2's embedding/head) counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _check_ids(example_ids: Any) -> torch.Tensor:
    if not isinstance(example_ids, torch.Tensor) or example_ids.dim() != 2 or example_ids.numel() == 0 \
            or example_ids.is_floating_point() or example_ids.is_complex():
        shape = list(example_ids.shape) if isinstance(example_ids, torch.Tensor) else type(example_ids).__name__
        raise ExportFailed(f"onnx: example_ids must be a non-empty integer tensor [batch, sequence], got {shape}")
    return example_ids.long()


def _trace_inputs(example_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The example the exporter sees: at least 2 x 2 (tiled from ``example_ids``) with one padded position.

    Size-1 dims get specialised: a trace at sequence length 1 takes transformers' single-query GQA path (Llama/Qwen2)
    and the graph then fails for longer inputs; the dynamo exporter refuses a dynamic dim whose example is 1. The
    padded position keeps the traced graph on the padding-mask path (transformers also never drops the mask while
    tracing, but this does not depend on it)."""
    b, t = example_ids.shape
    ids = example_ids.repeat(math.ceil(2 / b), math.ceil(2 / t))[: max(b, 2), : max(t, 2)].to(device)
    mask = torch.ones_like(ids)
    mask[-1, -1] = 0
    return ids, mask


def _export_torchscript(wrapper: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int | None) -> None:
    axes = {name: {0: BATCH, 1: SEQUENCE} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=list(INPUT_NAMES),
                      output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset or DEFAULT_OPSET,
                      do_constant_folding=True)


def _export_dynamo(wrapper: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int | None) -> None:
    batch, sequence = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
    shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    torch.onnx.export(wrapper, args, str(path), dynamo=True, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                      dynamic_shapes=shapes, opset_version=opset, external_data=False, optimize=True, verbose=False,
                      report=False, dump_exported_program=False)


#: tried in order. Why the TorchScript (legacy, ``dynamo=False``) exporter first: with torch 2.13 + transformers 5.25
#: both exporters produce graphs that match Llama, Qwen2 and GPT-2 at other batch/sequence sizes with left and right
#: padding, but tracing takes 0.2-2.5 s on the test models where torch.export + onnxscript takes 6-17 s (2 CPU cores),
#: and it is silent once its warnings are filtered. transformers keeps shape-dependent Python branches trace-safe
#: (the mask is always materialised under ``torch.jit.is_tracing()``), and :func:`_trace_inputs` avoids the one
#: specialisation that bites (sequence length 1). The dynamo exporter is the fallback for a model the tracer cannot
#: export, and for a torch without the deprecated TorchScript exporter.
EXPORTERS = (("torchscript", _export_torchscript), ("dynamo", _export_dynamo))


def export_onnx(model: nn.Module, out_path: Path, *, example_ids: torch.Tensor, opset: int | None = None) -> dict:
    """Write ``model``'s ``(input_ids, attention_mask) -> logits`` forward to ``out_path`` (see the module docstring).

    ``example_ids`` [batch, sequence] int64 is the example the exporter traces (any sizes: the axes are dynamic).
    ``opset``: the ONNX opset (default 17 for the TorchScript exporter, torch's default for the dynamo one).
    Returns ``{"opset", "inputs", "outputs", "bytes", "exporter", "seconds"}`` (inputs/outputs: name, dtype and
    shape, dynamic dims by name). ``model`` is left as it was (weights, train/eval mode). Raises
    :class:`ExportFailed` for a model over 2 GiB, non-float32 weights, or when no exporter succeeds.
    """
    out_path = Path(out_path)
    ids = _check_ids(example_ids)
    size = _weight_bytes(model)
    if size >= MAX_BYTES:
        raise ExportFailed(f"onnx: the model's weights are {size / 1024**3:.2f} GiB; an ONNX file with the weights "
                           f"inside is limited to 2 GiB (export a smaller or quantized model)")
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    if dtypes - {"float32"}:
        # onnxruntime's CPU provider lacks bfloat16/float16 kernels for much of a decoder, and the contract is
        # float32 logits: the caller casts (a copy) to float32 first.
        raise ExportFailed(f"onnx: the model has {'/'.join(sorted(dtypes))} weights; export a float32 copy")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model)
    args = _trace_inputs(ids, _device(model))
    errors: list[str] = []
    start = time.perf_counter()
    with _eval_mode(model), torch.no_grad():
        for name, export in EXPORTERS:
            try:
                with _quiet():
                    export(wrapper, args, out_path, opset)
                facts = _file_facts(out_path)
            except Exception as exc:
                errors.append(f"{name}: {error_summary(exc, 300)}")
                out_path.unlink(missing_ok=True)
                continue
            return {**facts, "exporter": name, "seconds": round(time.perf_counter() - start, 3)}
    raise ExportFailed(f"onnx: no exporter could export the model ({'; '.join(errors)})")


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _file_facts(path: Path) -> dict:
    """What the file declares; refuses one whose weights went to external data files."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportFailed("onnx: the exporter wrote the weights to external data files")

    def describe(v: Any) -> dict:
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": _dims(v)}

    initializers = {t.name for t in proto.graph.initializer}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "inputs": [describe(v) for v in proto.graph.input if v.name not in initializers],
            "outputs": [describe(v) for v in proto.graph.output], "bytes": path.stat().st_size}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # fatal only: onnxruntime logs warnings and run errors straight to stderr, and a run error is raised here anyway
    options.log_severity_level = 4
    options.intra_op_num_threads = torch.get_num_threads()  # the process's thread budget, as torch has it
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _cases(ids: torch.Tensor, vocab: int, max_len: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) to check: the example unpadded; one more row and a different length with the
    first row left-padded and the last right-padded; one single token (the size-1 dims a trace can specialise on)."""
    b, t = ids.shape
    t2 = t + 3 if max_len is None or t + 3 <= max_len else max(1, t - 3)
    g = torch.Generator().manual_seed(0)
    other = torch.randint(0, vocab, (b + 1, t2), generator=g)
    mask = torch.ones_like(other)
    pad = max(1, t2 // 3) if t2 > 1 else 0
    mask[0, :pad] = 0
    mask[-1, t2 - pad:] = 0
    cases = [(ids, torch.ones_like(ids)), (other, mask)]
    if (b, t) != (1, 1):
        single = torch.randint(0, vocab, (1, 1), generator=g)
        cases.append((single, torch.ones_like(single)))
    return cases


def verify_onnx(path: Path, model: nn.Module, example_ids: torch.Tensor, *, atol: float = 1e-3,
                rtol: float = 1e-3) -> dict:
    """Run ``path`` in onnxruntime (CPU) and compare its logits with ``model``'s at the unmasked positions.

    Checked on ``example_ids`` (all unmasked), on a batch one larger and a sequence 3 longer (3 shorter past the
    model's context) with left and right padding, and on a single token. Passes where
    ``|onnx - torch| <= atol + rtol * |torch|`` everywhere unmasked. Returns ``{"max_abs_diff", "shapes_checked"}``;
    raises :class:`ExportFailed` (with the max abs difference) when they differ or the file does not run.
    """
    ids = _check_ids(example_ids)
    try:
        session = _session(Path(path))
    except Exception as exc:
        raise ExportFailed(f"onnx: onnxruntime cannot load {Path(path).name}: {error_summary(exc)}") from None
    config = getattr(model, "config", None)
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    wrapper, device = _LogitsOnly(model), _device(model)
    worst, shapes = 0.0, []
    with _eval_mode(model), torch.no_grad():
        one = ids[:1, :1].to(device)
        vocab = getattr(config, "vocab_size", None) or int(wrapper(one, torch.ones_like(one)).shape[-1])
        for input_ids, mask in _cases(ids, vocab, max_len):
            want = wrapper(input_ids.to(device), mask.to(device)).float().cpu().numpy()
            try:
                got = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: input_ids.numpy(), INPUT_NAMES[1]: mask.numpy()})[0]
            except Exception as exc:
                raise ExportFailed(f"onnx: onnxruntime failed on input [{', '.join(map(str, input_ids.shape))}]: "
                                   f"{error_summary(exc)}") from None
            shape = [int(s) for s in input_ids.shape]
            if got.shape != want.shape:
                raise ExportFailed(f"onnx: logits shape {list(got.shape)} != torch's {list(want.shape)} for input {shape}")
            keep = mask.numpy().astype(bool)
            g, w = got[keep].astype(np.float64), want[keep].astype(np.float64)
            diff = np.abs(g - w)
            # NaN/inf from the file (a broken weight) counts as an infinite difference, not a silent pass
            diff[~np.isfinite(g) | ~np.isfinite(w)] = np.inf
            max_diff = float(diff.max()) if diff.size else 0.0
            worst = max(worst, max_diff)
            shapes.append(shape)
            if not np.all(diff <= atol + rtol * np.abs(w)):
                raise ExportFailed(f"onnx: onnxruntime's logits differ from the torch model's for input {shape} "
                                   f"(max abs diff {max_diff:.3g}, atol {atol:g}, rtol {rtol:g})")
    return {"max_abs_diff": worst, "shapes_checked": shapes}

