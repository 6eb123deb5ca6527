"""Turn a loaded teacher (TorchScript, torch.export, eager) into an editable eager ``nn.Sequential``.

Pruning and quantization need real ``nn.Module`` layers with parameters they can
mask, slice or swap. Uploaded teachers arrive as TorchScript (``torch.jit.script``
or ``torch.jit.trace``) or as a ``torch.export`` program; both are read-only
graphs. :func:`to_editable` rebuilds such a model as an eager ``nn.Sequential``
with the same weights when -- and only when -- its graph is a plain chain of
supported layers (:data:`SUPPORTED`), and checks the rebuilt model numerically on
a random input. Anything else (a residual add, a concat, a custom layer, two
inputs) raises ``Unsupported(...)`` naming what is in the way.

How each format is read (:mod:`.editable_torchscript`, :mod:`.editable_fx`; the supported layers and
the numeric check are in :mod:`.editable_chain`):

- TorchScript: the module's ``forward`` graph must only call its children's
  ``forward`` one after the other (``prim::CallMethod`` chain; nested containers
  recurse). Children are identified by ``original_name`` ("Linear", "Conv2d",
  ...); hyperparameters come from the scripted module's constants (``stride``,
  ``eps``, ...) or, for traced modules, from the constant arguments of the single
  aten call in the child's graph.
- torch.export: ``ExportedProgram`` or ``ExportedProgram.module()``; the graph's
  ``call_function`` nodes (``aten.linear``, ``aten.conv2d``, ``aten.relu``, ...)
  must form a chain from the single input to the output; weights are the
  ``get_attr`` tensors.
- eager: an ``nn.Sequential`` (nested ones are flattened) of supported layers is
  deep-copied; any other eager module is exported with ``torch.export`` (needs
  ``example_inputs`` or a first Linear/Conv layer to infer an input) and read as
  above.

Imports only torch and the engine's types.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from engine.errors import Unsupported
from engine.compression.editable_chain import SUPPORTED, infer_example, unsupported, verify
from engine.compression.editable_fx import from_fx, fx_example
from engine.compression.editable_torchscript import from_script

__all__ = ["SUPPORTED", "to_editable"]


def to_editable(module: Any, example_inputs: Sequence[torch.Tensor] | None = None, *, atol: float = 1e-4) -> nn.Sequential:
    """An eager ``nn.Sequential`` equivalent to ``module`` with copies of its weights.

    ``module``: a TorchScript module, a ``torch.export.ExportedProgram`` (or its
    ``.module()``), or an eager module. ``example_inputs`` (one tensor in a
    tuple) is used for the numeric check (and to export eager non-Sequential
    modules); by default a random batch is built from the first layer's shape
    (``[2, in_features]``, ``[2, C, 32]``, ``[2, C, 16, 16]``) or from the
    export's recorded input shape. The result is in eval mode.

    Raises ``EngineError("unsupported")`` naming the op/layer when the model is
    not such a chain, or when the rebuilt model does not reproduce the outputs.
    """
    if isinstance(module, torch.jit.ScriptModule):
        kind = "TorchScript"
        layers = from_script(module)
        reference: Callable = module
    elif isinstance(module, torch.export.ExportedProgram):
        kind = "torch.export"
        gm = module.module()
        layers = from_fx(gm)
        reference = gm
        example_inputs = example_inputs or fx_example(gm)
    elif isinstance(module, torch.fx.GraphModule):
        kind = "torch.export"
        layers = from_fx(module)
        reference = module
        example_inputs = example_inputs or fx_example(module)
    elif isinstance(module, nn.Module):
        kind = "eager"
        reference = module
        if isinstance(module, nn.Sequential):
            layers = _from_eager_sequential(module)
        else:
            example_inputs = example_inputs or infer_example(module)
            if example_inputs is None:
                raise unsupported(kind, f"a custom module {type(module).__name__} with no Linear/Conv input layer")
            was_training = module.training
            module.eval()
            try:
                gm = torch.export.export(module, tuple(example_inputs)).module()
            except Exception as exc:  # noqa: BLE001 - any export failure means "not editable"
                raise unsupported(kind, f"a module torch.export cannot trace ({type(exc).__name__}: {str(exc)[:200]})") from None
            finally:
                module.train(was_training)
            layers = from_fx(gm)
    else:
        raise Unsupported(f"cannot edit a {type(module).__name__}; expected a torch module")

    result = nn.Sequential(*layers).eval()
    verify(reference, result, example_inputs, kind, atol)
    return result


# --------------------------------------------------------------------------- eager


def _from_eager_sequential(seq: nn.Sequential) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for child in seq.children():
        name = type(child).__name__
        if isinstance(child, nn.Sequential):
            layers.extend(_from_eager_sequential(child))
        elif name in SUPPORTED and type(child).__module__.startswith("torch.nn"):
            layers.append(copy.deepcopy(child))
        else:
            raise unsupported("eager", f"layer {name}")
    return layers
