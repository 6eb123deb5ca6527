"""Fast structural check of an uploaded model file.

``inspect_model(path, format) -> dict``; never raises for a bad file:

* success: ``{"ok": true, "format", "num_parameters", "inputs": [...], "outputs": [...]}``
  where each input/output is ``{"name", "shape" (ints, null for dynamic dims), "dtype"}``.
  TorchScript archives carry no shape information, so their lists are empty.
* failure: ``{"ok": false, "error": "<human-readable reason>"}``

CLI (one JSON line on stdout; exit 0 on success, 2 on failure)::

    python -m engine.inspection.model --format torchscript|onnx|torch_export|safetensors \
        [--architecture JSON] PATH

``torch_export`` archives are checked by ``pt2_safety.check_pt2_archive`` (nothing is unpickled
or evaluated) and report their inputs/outputs from the program's signature; ``safetensors``
needs ``--architecture`` to be built and checked (strict key/shape match) - without it only
the tensor count is reported.

Runs on every upload, so it only parses the file: torch is imported only for
TorchScript, and ONNX models are checked with ``onnx.checker`` without creating
an inference session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

from engine.errors import error_summary
from jobspec.base import MODEL_FORMATS
from engine.inspection.model_facts import (
    count_onnx_parameters,
    count_torchscript_parameters,
    external_data_error,
    torchscript_load_error,
)

FORMATS = MODEL_FORMATS  # the spec's list: one definition


def _onnx_value_info(value: Any) -> dict[str, Any]:
    import onnx

    tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if tensor_type is None:
        return {"name": value.name, "shape": None, "dtype": None}
    shape = None
    if tensor_type.HasField("shape"):
        shape = [int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except Exception:
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    return {"name": value.name, "shape": shape, "dtype": dtype}


def _inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        return {"ok": False, "error": f"not a valid ONNX model: {error_summary(exc)}"}
    if not model.HasField("graph") or not model.graph.node:
        return {"ok": False, "error": "not a valid ONNX model: the file has no graph nodes"}
    if (refused := external_data_error(model)) is not None:
        return {"ok": False, "error": refused}
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        return {"ok": False, "error": f"ONNX model failed validation: {error_summary(exc)}"}
    init_names = {i.name for i in model.graph.initializer}
    return {
        "ok": True,
        "format": "onnx",
        "num_parameters": count_onnx_parameters(model),
        "inputs": [_onnx_value_info(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [_onnx_value_info(v) for v in model.graph.output],
    }


def _inspect_torchscript(path: Path) -> dict[str, Any]:
    import torch

    from engine.errors import EngineError
    from engine.inspection.zipcheck import refuse_unsafe_zip

    if zipfile.is_zipfile(path):  # torch's reader and zipfile must see the same members
        try:
            refuse_unsafe_zip(path, "invalid_model", "TorchScript archive")
        except EngineError as exc:
            return {"ok": False, "error": exc.message}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        return {"ok": False, "error": torchscript_load_error(path, exc)}
    if not hasattr(module, "forward"):
        return {"ok": False, "error": "TorchScript module has no forward() method"}
    return {
        "ok": True,
        "format": "torchscript",
        "num_parameters": count_torchscript_parameters(module),
        "inputs": [],
        "outputs": [],
    }


def _inspect_torch_export(path: Path) -> dict[str, Any]:
    from engine.inspection.pt2 import safe_load_exported
    from engine.errors import EngineError

    try:
        ep = safe_load_exported(path)
    except EngineError as exc:
        return {"ok": False, "error": exc.message}

    def info(spec: Any) -> dict[str, Any]:
        meta = getattr(getattr(spec, "arg", None), "name", None)
        node = nodes.get(meta)
        val = node.meta.get("val") if node is not None else None
        shape = None if val is None else [int(d) if isinstance(d, int) else None for d in val.shape]
        dtype = None if val is None else str(val.dtype).replace("torch.", "")
        return {"name": meta, "shape": shape, "dtype": dtype}

    nodes = {n.name: n for n in ep.graph.nodes}
    sig = ep.graph_signature
    user_inputs = [s for s in sig.input_specs if str(s.kind).endswith("USER_INPUT")]
    user_outputs = [s for s in sig.output_specs if str(s.kind).endswith("USER_OUTPUT")]
    return {
        "ok": True,
        "format": "torch_export",
        "num_parameters": int(sum(t.numel() for t in ep.state_dict.values())),
        "inputs": [info(s) for s in user_inputs],
        "outputs": [info(s) for s in user_outputs],
    }


def _inspect_safetensors(path: Path, architecture: dict | None) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            total = 0
            for k in keys:
                total += int(math.prod(f.get_slice(k).get_shape()))
    except Exception as exc:
        return {"ok": False, "error": f"not a valid safetensors file: {error_summary(exc)}"}
    if architecture is None:
        return {"ok": True, "format": "safetensors", "num_parameters": total, "inputs": [], "outputs": [],
                "note": "no architecture given: only the tensors were checked"}
    from engine.teachers.torch_modules import load_safetensors_module
    from engine.errors import EngineError

    try:
        module = load_safetensors_module(path, architecture, what="model")
    except EngineError as exc:
        return {"ok": False, "error": exc.message}
    inputs, outputs = [], []
    shape = architecture.get("input_shape") or ([architecture["in_features"]] if "in_features" in architecture else None)
    if shape is not None:
        inputs.append({"name": "x", "shape": [None, *[int(d) for d in shape]], "dtype": "float32"})
    if "out_features" in architecture:
        outputs.append({"name": "output", "shape": [None, int(architecture["out_features"])], "dtype": "float32"})
    return {"ok": True, "format": "safetensors", "num_parameters": int(sum(p.numel() for p in module.parameters())),
            "inputs": inputs, "outputs": outputs}


def _inspect_hf(path: Path) -> dict[str, Any]:
    """A zipped Hugging Face causal LM: unpacked into the scratch directory, loaded, described."""
    import tempfile

    from engine.errors import EngineError
    from engine.lm import model_dir

    with tempfile.TemporaryDirectory(prefix="hf-", dir=".") as tmp:
        try:
            directory = model_dir.unpack(path, Path(tmp))
            facts = model_dir.facts(directory)
        except EngineError as exc:
            return {"ok": False, "error": exc.message}
    return {"ok": True, "format": "hf_transformers", "num_parameters": facts["num_parameters"],
            "inputs": [{"name": "input_ids", "shape": [None, None], "dtype": "int64"}],
            "outputs": [{"name": "logits", "shape": [None, None, facts["vocab_size"]], "dtype": "float32"}],
            "hf": facts}


def inspect_model(path: Path, format: str, architecture: dict | None = None) -> dict[str, Any]:
    """Check that ``path`` is a loadable model of ``format``; see module docstring."""
    path = Path(path)
    if format not in FORMATS:
        return {"ok": False, "error": f"unsupported model format {format!r} (expected one of: {', '.join(FORMATS)})"}
    if not path.exists():
        return {"ok": False, "error": f"file not found: {path}"}
    if not path.is_file():
        return {"ok": False, "error": f"not a regular file: {path}"}
    if path.stat().st_size == 0:
        return {"ok": False, "error": "the file is empty"}
    try:
        if format == "onnx":
            return _inspect_onnx(path)
        if format == "torch_export":
            return _inspect_torch_export(path)
        if format == "safetensors":
            return _inspect_safetensors(path, architecture)
        if format == "hf_transformers":
            return _inspect_hf(path)
        return _inspect_torchscript(path)
    except Exception as exc:  # never let a hostile file crash the caller
        return {"ok": False, "error": f"cannot inspect {format} model: {error_summary(exc)}"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Keep the one-JSON-line contract even for usage errors.
        print(json.dumps({"ok": False, "error": f"usage: {message}"}))
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m engine.inspection.model", description="Inspect a model file.")
    parser.add_argument("--format", required=True, help=" | ".join(FORMATS))
    parser.add_argument("--architecture", default=None, help="JSON architecture (safetensors)")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    architecture = None
    if args.architecture:
        try:
            architecture = json.loads(args.architecture)
            if not isinstance(architecture, dict):
                raise ValueError("must be a JSON object")
        except ValueError as exc:
            print(json.dumps({"ok": False, "error": f"--architecture: {exc}"}))
            return 2
    # Anything a library prints must not corrupt the JSON line on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = inspect_model(args.path, args.format, architecture)
    print(json.dumps(result))
    return 0 if result.get("ok") else 2


if __name__ == "__main__":
    sys.exit(main())
