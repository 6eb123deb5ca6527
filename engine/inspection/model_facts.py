"""Facts read from a loaded model, shared by the upload check and the teacher loaders.

* :func:`count_torchscript_parameters` / :func:`count_onnx_parameters`: a loaded module / ``onnx.ModelProto``
  in, its number of weights (an int) out.
* :func:`torchscript_load_error`: the file and the exception ``torch.jit.load`` raised in, a one-line reason
  a user can act on out.
* :func:`external_data_error`: an ``onnx.ModelProto`` in, the reason it is refused for keeping tensors outside
  the file, or None.

Imports nothing of the engine but its errors, so :mod:`engine.inspection.model`, :mod:`engine.inspection.pt2`
and the teachers can all use it without importing each other; torch and onnx are imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import error_summary


def torchscript_load_error(path: Path, exc: BaseException) -> str:
    """Why ``torch.jit.load`` refused ``path``, in words a user can act on."""
    text = str(exc)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        magic = b""
    if magic != b"PK\x03\x04":
        return "not a TorchScript archive: TorchScript files are zip archives and this file is not one"
    if "failed finding central directory" in text:
        return "not a loadable TorchScript archive: the zip archive is truncated or corrupt"
    if "constants.pkl" in text or "bytecode.pkl" in text:
        return (
            "not a TorchScript archive: this looks like a torch.save() checkpoint; "
            "export the model with torch.jit.script(model).save(path) or torch.jit.trace instead"
        )
    return f"not a loadable TorchScript archive: {error_summary(exc)}"


def count_torchscript_parameters(module: Any) -> int:
    """Weights in a TorchScript module.

    Parameters first; a frozen or traced-with-constants module may hold its
    weights as plain state-dict tensors, or as tensor constants inlined into
    the graph, so fall back to those in turn.
    """
    import torch

    total = sum(int(p.numel()) for p in module.parameters())
    if total:
        return total
    total = sum(int(t.numel()) for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    if total:
        return total
    try:
        for node in module.graph.nodes():
            if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
                total += int(node.t("value").numel())
    except Exception:  # graph introspection is best effort
        pass
    return total


def count_onnx_parameters(model: Any) -> int:
    """Sum of the element counts of the main graph's initializers."""
    total = 0
    for init in model.graph.initializer:
        total += int(math.prod(init.dims))
    for sparse in model.graph.sparse_initializer:
        total += int(math.prod(sparse.values.dims))
    return total


def _graph_tensors(graph: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor a graph holds (initializers, sparse initializers, node attributes), subgraphs
    included, as ``(description, TensorProto)``."""
    for t in getattr(graph, "initializer", ()):  # a FunctionProto has nodes only
        yield f"{where}initializer {t.name!r}", t
    for sp in getattr(graph, "sparse_initializer", ()):
        yield f"{where}sparse initializer {sp.values.name!r}", sp.values
        yield f"{where}sparse initializer {sp.values.name!r} (indices)", sp.indices
    for node in graph.node:
        for attr in node.attribute:
            here = f"{where}attribute {attr.name!r} of node {node.name or node.op_type!r}"
            if attr.HasField("t"):
                yield here, attr.t
            for t in attr.tensors:
                yield here, t
            if attr.HasField("sparse_tensor"):
                yield here, attr.sparse_tensor.values
            for sp in attr.sparse_tensors:
                yield here, sp.values
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g, f"{here}: ")
            for g in attr.graphs:
                yield from _graph_tensors(g, f"{here}: ")


def external_data_error(model: Any) -> str | None:
    """Why an ONNX model is refused for keeping tensor data outside the file (``data_location: EXTERNAL``,
    a path onnx/onnxruntime would open, anywhere on disk), or None when every tensor is inline."""
    import onnx

    graphs = [("", model.graph)] + [(f"function {f.name!r}: ", f) for f in model.functions]
    for prefix, graph in graphs:
        for where, tensor in _graph_tensors(graph, prefix):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
                location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
                return (f"ONNX {where} keeps its data in an external file ({location[:200]!r}); external data "
                        f"could name any file on the machine, so only self-contained models are accepted "
                        f"(save with onnx.save_model(model, path, save_as_external_data=False))")
    return None
