"""ONNX Runtime int8: export a float model to ONNX, then quantize the file (dynamic, or static QDQ with
calibration batches). The result is an ``.onnx`` file run by ONNX Runtime (``steps.compress.OrtModule``).

``export_onnx(model, path, example_inputs) -> path``; ``quantize_onnx(src, dst, mode, feeds) -> dst``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from engine.errors import InvalidSpec


class Quiet:
    """Silences torch.ao's deprecation chatter (FX/eager quantization still work in 2.13)."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)



def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Sequence[torch.Tensor]) -> Path:
    """Legacy (TorchScript-based) ONNX export with input ``input`` / output ``output`` and a dynamic batch."""
    path = Path(path)
    with Quiet(), torch.no_grad():
        torch.onnx.export(
            model.eval(),
            tuple(example_inputs),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


class _Reader:
    """``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # onnxruntime may call it; one pass is all we need
        pass


def quantize_onnx(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    mode: Literal["dynamic", "static"] = "dynamic",
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
) -> Path:
    """Quantize an ONNX model file to int8 with ONNX Runtime; returns ``out_path``.

    ``dynamic``: ``quantize_dynamic`` (int8 weights, QInt8). ``static``: ``quantize_static``
    in QDQ format (QUInt8 activations, QInt8 per-channel weights) calibrated on
    ``calibration`` (feed dicts ``{input_name: array}``). The model is first run
    through ``quant_pre_process`` (shape inference + graph optimisation); if that
    fails, the original file is quantized.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix="distillery-q-") as tmp:
        src = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(onnx_path), str(src), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
            src = onnx_path
        if mode == "dynamic":
            quantize_dynamic(str(src), str(out_path), weight_type=QuantType.QInt8)
        elif mode == "static":
            if calibration is None:
                raise InvalidSpec("onnx_int8 static needs calibration data")

            class Reader(_Reader, CalibrationDataReader):
                pass

            quantize_static(
                str(src),
                str(out_path),
                Reader(calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        else:
            raise InvalidSpec(f"onnx_int8 mode must be dynamic or static, got {mode!r}")
    return out_path


