"""Compression steps for Hugging Face causal LMs: dynamic int8 quantization and structured MLP pruning.

* :func:`quantize_dynamic_int8` (a causal LM) -> ``(quantized copy, facts)``: every ``nn.Linear`` (GPT-2's
  ``Conv1D`` layers are first rewritten as the equivalent ``nn.Linear``) replaced by torch.ao's dynamic int8 Linear:
  weights int8, symmetric, one scale per output channel, computed once; activations quantized to uint8 per batch
  on the fly from their observed range, the matmul in int8 with int32 accumulation (fbgemm / x86 / onednn kernels).
  The copy runs on the CPU (float32 outside the Linear layers), with ``forward(input_ids=...)`` and ``generate()``;
  it is not ``save_pretrained``-able (torch.ao's packed weights are no safetensors tensors).
* :func:`quantized_size_bytes` (a model, float or quantized) -> the bytes of its stored weights.
* :func:`prune_mlp_channels` (a causal LM, ``amount``, optional calibration :class:`TokenBlocks`) -> ``(smaller
  model, facts)``: the same share of every decoder layer's MLP intermediate units removed (gate/up rows and down
  columns; gpt2's c_fc/c_proj; the other :data:`engine.lm.students.MLP_LAYOUTS`), ranked by weight norm or, with
  calibration text, by the Wanda-style activation-aware score. The result is a fresh model of the same class whose
  config's intermediate size matches, so ``save_pretrained`` / ``from_pretrained`` round-trip.

The input model is never modified. Facts are JSON-able dicts for reports and events.

References: B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam, D. Kalenichenko, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (affine int8 with int32
accumulation); PyTorch, "Dynamic Quantization" (torch.ao.quantization.quantize_dynamic,
https://pytorch.org/docs/stable/quantization.html); M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective
Pruning Approach for Large Language Models" (Wanda), arXiv:2306.11695, 2023 (weight magnitude x input activation
norm, computed from a small calibration set, no retraining).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.compression.onnx_quantization import Quiet
from engine.errors import InvalidSpec, Unsupported, error_summary
from engine.lm.students import (INTERMEDIATE_KEYS, MLP_LAYOUTS, _find_mlp, _is_conv1d, _text_config, _unit_axis,
                                decoder_layers, intermediate_size)
from engine.lm.text_data import TokenBlocks

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Sequences per calibration forward pass (as :data:`engine.lm.training.EVAL_BATCH`).
CALIBRATION_BATCH = 16


# ---- dynamic int8 quantization --------------------------------------------------------------------------------------


def quantize_dynamic_int8(model: PreTrainedModel, *, quantize_head: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` whose ``nn.Linear`` layers are torch.ao dynamic int8 Linear layers (weights per output
    channel), float32, on the CPU, in eval mode; and its facts: ``linear_layers`` (quantized), ``conv1d_converted``,
    ``lm_head`` (``"int8"`` or why it stayed float), ``bytes_before`` / ``bytes_after`` (:func:`quantized_size_bytes`).

    GPT-2's ``Conv1D`` (y = x W + b with W stored [in, out]) is rewritten as ``nn.Linear`` with the transposed weight
    first: the same function, which torch.ao knows how to quantize.

    The LM head is quantized unless ``quantize_head`` is False, or it shares its weight with the input embeddings:
    quantizing a tied head would keep the float embeddings *and* add an int8 copy of the same matrix (a bigger
    model), so a tied head stays float. Measured on the test Llama (4 layers, hidden 96, vocabulary 512, trained
    1200 steps): held-out perplexity float 17.53, every Linear int8 17.81, all but the head 17.80: the head costs
    0.04 % of perplexity, the rest of the network the other 1.5 %, so by default it is quantized with the rest.
    That 1.5 % is the activations': int8 per-channel weights alone (simulated) leave the perplexity at 17.53, while
    the x86 / fbgemm / onednn dynamic kernels quantize each activation tensor with one scale over a 7-bit range
    (``reduce_range``, against int16 overflow on CPUs without VNNI). Per-token 8-bit activations (simulated: 17.53;
    torchao's ``Int8DynamicActivationInt8WeightConfig``, not installed here) would remove it.

    Raises :class:`Unsupported` when there is nothing to quantize (no ``nn.Linear`` / ``Conv1D`` outside a tied
    head) or the CPU has no int8 engine.
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise Unsupported(f"dynamic int8 quantization needs an eager torch model, got {type(model).__name__}")
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
        raise Unsupported("dynamic int8 quantization: this torch build has no quantized CPU engine")
    bytes_before = quantized_size_bytes(model)
    # deepcopy first: the caller's model (possibly on a GPU, possibly bf16) is never touched. The int8 kernels are
    # CPU-only, and torch.ao's observers and the float parts left around them expect float32.
    q = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    converted = _conv1d_to_linear(q)

    head = q.get_output_embeddings() if hasattr(q, "get_output_embeddings") else None
    inputs = q.get_input_embeddings() if hasattr(q, "get_input_embeddings") else None
    tied = (head is not None and inputs is not None and getattr(head, "weight", None) is not None
            and head.weight is inputs.weight)
    head_name = next((name for name, m in q.named_modules() if m is head), None) if head is not None else None
    if head_name is None:
        head_note = "none found"
    elif tied:
        head_note = "float (tied to the input embeddings)"
    elif not quantize_head:
        head_note = "float (quantize_head=False)"
    else:
        head_note = "int8"
    skip = {head_name} if head_note != "int8" else set()
    linears = [name for name, m in q.named_modules() if type(m) is nn.Linear and name not in skip]
    if not linears:
        kinds = sorted({type(m).__name__ for m in q.modules() if isinstance(m, nn.Module) and
                        any(p.dim() == 2 for p in m.parameters(recurse=False))})
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise Unsupported(f"dynamic int8 quantization of this {kind} model: it has no nn.Linear (or Conv1D) layer "
                          f"to quantize"
                          f"{' besides its tied LM head' if tied else ''}; its weight-holding modules are "
                          f"{', '.join(kinds) or 'none'}")

    from torch.ao.quantization import per_channel_dynamic_qconfig

    # A name -> qconfig spec (not {nn.Linear}) so that the head can be left out by name; per-channel weights: one
    # scale per output row, since LM weight rows differ in range by orders of magnitude (a per-tensor scale would
    # round the small rows to a few levels).
    with Quiet():
        try:
            q = torch.ao.quantization.quantize_dynamic(q, {name: per_channel_dynamic_qconfig for name in linears},
                                                       dtype=torch.qint8, inplace=True)
        except (RuntimeError, NotImplementedError, AssertionError) as exc:
            raise Unsupported(f"dynamic int8 quantization failed on the {torch.backends.quantized.engine} engine: "
                              f"{error_summary(exc)}") from None
    facts = {"method": "dynamic_int8", "weights": "int8, symmetric, per output channel",
             "activations": "uint8, one scale per tensor per call (7-bit range on the x86/fbgemm/onednn engines)",
             "engine": torch.backends.quantized.engine, "linear_layers": len(linears), "conv1d_converted": converted,
             "lm_head": head_note, "bytes_before": bytes_before, "bytes_after": quantized_size_bytes(q)}
    return q, facts


def _conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` (weight [in, out]) in place by an ``nn.Linear`` computing the same
    function (weight [out, in]); the number replaced. GPT-2's blocks only call the module, so the swap is safe."""
    found = [(name, m) for name, m in model.named_modules() if _is_conv1d(m)]
    for name, conv in found:
        weight = conv.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(found)


def quantized_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored weights: every tensor of its ``state_dict`` once (tied weights share one
    storage), a quantized weight as its int8 values plus its quantization parameters as torch stores them (per
    channel: one float64 scale and one int64 zero point per row), every other tensor at its own dtype (float
    parameters, biases, norms, persistent buffers). Works for float models too (their plain size)."""
    seen: set[tuple[int, int, str]] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, (tuple, list)):  # torch.ao's packed params: (int8 weight, float bias)
            for item in value:
                add(item)
            return
        if not isinstance(value, torch.Tensor):
            return
        key = (value.data_ptr(), value.numel(), str(value.dtype))
        if key in seen or value.numel() == 0:
            return
        seen.add(key)
        total += value.numel() * value.element_size()
        if value.is_quantized:
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                   torch.per_channel_affine_float_qparams):
                for qparam in (value.q_per_channel_scales(), value.q_per_channel_zero_points()):
                    total += qparam.numel() * qparam.element_size()
            else:
                total += 16  # one float64 scale and one int64 zero point

    for value in model.state_dict().values():
        add(value)
    return total


# ---- structured MLP pruning -----------------------------------------------------------------------------------------


def prune_mlp_channels(model: PreTrainedModel, amount: float, *,
                       calibration: TokenBlocks | None = None) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A new model of ``model``'s class with ``amount`` (0 <= amount < 1) of every decoder layer's MLP intermediate
    units removed; the same number ``round_half_up((1 - amount) * intermediate)`` (at least 1) is kept in each layer,
    so one ``intermediate_size`` in the config describes them all. The kept units keep their original order and
    their exact weights (gate/up rows and biases, down columns; Conv1D axes for gpt2), everything else is copied.

    Ranking, per layer:

    * no ``calibration``: the L2 norm of all the weights that touch a unit (in rows, their biases, out column) -
      magnitude pruning of whole neurons, the same criterion as :func:`engine.lm.students.derive_student`'s width;
    * ``calibration`` blocks: the Wanda-style score (Sun et al. 2023) ``||a_j||_2 * ||W_down[:, j]||_2``, where
      ``a_j`` is unit j's activation (the down projection's input, after the gate) over the calibration tokens
      (padding excluded). Removing unit j alone changes the down projection's outputs on those tokens by exactly the
      matrix ``a_j W_down[:, j]^T``, whose Frobenius norm this is; so the score ranks units by the error their removal
      causes on real text, which weight norms alone cannot see (a large weight on a unit that rarely fires).

    Measured on the test Llama (4 layers, 256 units each, trained 1200 steps, held-out perplexity 17.5), removing
    half the units: weight norm 113.0, random units 68-77, Wanda 41.2; with mean |a_j| instead of the L2 norm 56.2
    (the L2 norm, the paper's, is what the exact error above calls for). A quarter: norm 37.1, random 29-31, Wanda
    22.8. Weight norms are a weak signal in a trained LM (here worse than chance); prefer calibration text.

    Facts: ``criterion`` (``"weight_norm"`` | ``"wanda"``), ``amount``, ``intermediate_before`` / ``_after``,
    ``units_kept`` (count per layer), ``kept_units`` (the kept indices per layer), ``parameters_before`` / ``_after``,
    and ``calibration_tokens`` with calibration. The model keeps its dtype, device and train/eval mode.

    Raises :class:`InvalidSpec` for an ``amount`` outside [0, 1) or empty calibration blocks, :class:`Unsupported`
    for a model without one of the :data:`~engine.lm.students.MLP_LAYOUTS` in every decoder layer matching the
    config's intermediate size (MoE, per-layer sizes, heterogeneous configs).
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= float(amount) < 1.0:
        raise InvalidSpec(f"prune amount must be a number in [0, 1) (the share of each decoder layer's MLP "
                          f"intermediate units removed), got {amount!r}")
    if calibration is not None and (calibration.n == 0 or not bool(calibration.attention_mask.bool().any())):
        raise InvalidSpec("prune: the calibration blocks hold no tokens")
    config = copy.deepcopy(model.config)
    text = _text_config(config)
    kind = getattr(text, "model_type", type(model).__name__)
    key, path, ins, outs, mlps = _mlp_layout(model, text)
    m = intermediate_size(text)
    keep_n = max(1, int((1.0 - float(amount)) * m + 0.5))

    if calibration is not None:
        activation = _unit_activation_norms(model, [mlp.get_submodule(outs[0]) for mlp in mlps], calibration)
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        for i, mlp in enumerate(mlps):
            projections = _projections(mlp, ins, outs)
            if calibration is None:
                score = torch.zeros(m, dtype=torch.float64, device=_device_of(mlp))
                for p, into in projections:
                    score += p.weight.detach().to(torch.float64).pow(2).sum(dim=1 - _unit_axis(p, into))
                    if into and getattr(p, "bias", None) is not None:
                        score += p.bias.detach().to(torch.float64).pow(2)
            else:
                down = mlp.get_submodule(outs[0])
                column = down.weight.detach().to(torch.float64).pow(2).sum(dim=1 - _unit_axis(down, False)).sqrt()
                score = activation[i].to(column.device) * column
            # Stable sort: ties keep the lower index, so the choice is deterministic; sorted back to the original
            # order so the kept units stay in place relative to each other (nothing else depends on their order).
            kept.append(torch.sort(torch.argsort(score, descending=True, stable=True)[:keep_n]).values.cpu())

    prefix, _ = decoder_layers(model)
    state = dict(model.state_dict())
    for i, mlp in enumerate(mlps):
        base = f"{prefix}.{i}." + (f"{path}." if path else "")
        for name, (p, into) in zip(ins + outs, _projections(mlp, ins, outs)):
            axis = _unit_axis(p, into)
            w_key = f"{base}{name}.weight"
            state[w_key] = state[w_key].index_select(axis, kept[i].to(state[w_key].device))
            b_key = f"{base}{name}.bias"
            if into and b_key in state:
                state[b_key] = state[b_key].index_select(0, kept[i].to(state[b_key].device))
    setattr(text, key, keep_n)

    first = next(model.parameters())
    with torch.device("cpu"):
        pruned = type(model)(config)
    try:
        pruned.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise Unsupported(f"pruning the MLPs of a {kind} model: the model built with {key}={keep_n} does not take "
                          f"the sliced weights: {error_summary(exc)}") from None
    pruned = pruned.to(device=first.device, dtype=first.dtype).train(model.training)
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    facts: dict[str, Any] = {
        "criterion": "wanda" if calibration is not None else "weight_norm", "amount": float(amount),
        "intermediate_before": m, "intermediate_after": keep_n, "units_kept": [keep_n] * len(mlps),
        "kept_units": [k.tolist() for k in kept],
        "parameters_before": sum(p.numel() for p in model.parameters()),
        "parameters_after": sum(p.numel() for p in pruned.parameters()),
    }
    if calibration is not None:
        facts["calibration_tokens"] = int(calibration.attention_mask.sum())
    return pruned, facts


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter."""
    return next(module.parameters()).device


def _projections(mlp: nn.Module, ins: tuple[str, ...], outs: tuple[str, ...]) -> list[tuple[nn.Module, bool]]:
    """(module, projects into the units) for the MLP's input then output projections."""
    return [(mlp.get_submodule(n), True) for n in ins] + [(mlp.get_submodule(n), False) for n in outs]


def _mlp_layout(model: nn.Module, text: Any) -> tuple[str, str, tuple[str, ...], tuple[str, ...], list[nn.Module]]:
    """(config key of the intermediate size, MLP path in a layer, in / out projection names, each layer's MLP) when
    every decoder layer has the same known dense MLP layout of the config's intermediate size; else Unsupported."""
    kind = getattr(text, "model_type", type(model).__name__)
    layouts = "; ".join(f"{'/'.join(i)} -> {'/'.join(o)}" for i, o in MLP_LAYOUTS)
    needs = (f"it needs a dense MLP with one of the layouts {layouts} (nn.Linear or Conv1D) in every decoder layer "
             f"and one intermediate size in the config ({', '.join(INTERMEDIATE_KEYS)})")
    if getattr(text, "is_heterogeneous", False):
        raise Unsupported(f"MLP pruning is not supported for {kind}: its config is heterogeneous (per layer); {needs}")
    d = text.to_dict()
    key = next((k for k in INTERMEDIATE_KEYS if k in d), None)
    if key is None or isinstance(d[key], (list, tuple)):
        raise Unsupported(f"MLP pruning is not supported for {kind}: "
                          f"{'no intermediate size in its config' if key is None else f'its config lists one {key} per layer'}; "
                          f"{needs}")
    m = intermediate_size(text)
    _, layers = decoder_layers(model)
    found = _find_mlp(layers[0]) if len(layers) else None
    if found is None:
        raise Unsupported(f"MLP pruning is not supported for {kind}: no known MLP in its decoder layers; {needs}")
    path, ins, outs = found
    mlps = []
    for index, layer in enumerate(layers):
        if _find_mlp(layer) != found:
            raise Unsupported(f"MLP pruning is not supported for {kind}: decoder layer {index} does not have the MLP "
                              f"{path or 'layer'}.{'/'.join(ins + outs)} of layer 0")
        mlp = layer.get_submodule(path) if path else layer
        widths = {p.weight.shape[_unit_axis(p, into)] for p, into in _projections(mlp, ins, outs)}
        # A mismatch means the found MLP is not the one the config sizes (e.g. an MoE's shared expert).
        if widths != {m}:
            raise Unsupported(f"MLP pruning is not supported for {kind}: layer {index}'s {'/'.join(ins + outs)} have "
                              f"{sorted(widths)} intermediate units, the config's {key} says {m}; {needs}")
        mlps.append(mlp)
    return key, path, ins, outs, mlps


def _unit_activation_norms(model: nn.Module, downs: list[nn.Module], blocks: TokenBlocks) -> list[torch.Tensor]:
    """Per layer, ``||a_j||_2`` over the calibration tokens: the L2 norm of each intermediate unit's activation, read
    as the input of the layer's down projection (a forward pre-hook), padding positions left out."""
    sums = [None] * len(downs)
    mask_now: list[torch.Tensor] = []  # the running batch's attention mask, flattened, for the hooks

    def hook(index: int) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().reshape(-1, args[0].shape[-1])
            a = a[mask_now[0].to(a.device)] if a.shape[0] == mask_now[0].numel() else a
            squares = a.to(torch.float64).pow(2).sum(dim=0)
            sums[index] = squares if sums[index] is None else sums[index] + squares
        return record

    handles = [down.register_forward_pre_hook(hook(i)) for i, down in enumerate(downs)]
    device = _device_of(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, blocks.n, CALIBRATION_BATCH):
                batch = blocks.select(slice(start, start + CALIBRATION_BATCH))
                mask_now[:] = [batch.attention_mask.reshape(-1).bool()]
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if any(s is None for s in sums):
        raise Unsupported("prune: the calibration forward pass did not reach every decoder layer's MLP")
    return [s.sqrt() for s in sums]

