"""Students for Hugging Face causal LMs: derived from the teacher (fewer layers, narrower MLPs) or fresh.

* :func:`derive_student` (teacher ``PreTrainedModel``, ``depth``, ``width``) -> a new model of the teacher's class whose
  decoder keeps an evenly spaced share of the teacher's layers, initialised with the teacher's weights; the
  DistilBERT recipe (V. Sanh, L. Debut, J. Chaumond, T. Wolf, "DistilBERT, a distilled version of BERT: smaller,
  faster, cheaper and lighter", NeurIPS EMC² Workshop 2019: every other layer of the teacher), which is also how
  Hugging Face's DistilGPT2 (6 of GPT-2's 12 layers) was initialised. ``width`` < 1 also narrows every MLP to the
  intermediate units with the largest weight norms.
* :func:`fresh_student` (teacher config, portable overrides) -> a randomly initialised model of the teacher's
  architecture (the caller seeds torch).
* :func:`describe` (model) -> a JSON-able dict of the model's size and shape, for reports and events.

Every student is a fresh object in train mode, float32, on the CPU, whose config matches its modules so that
``save_pretrained`` / ``from_pretrained`` round-trip. ``trust_remote_code`` is never used: only architectures that
transformers itself implements are built.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.errors import InvalidSpec, Unsupported, error_summary

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

#: Where the common architectures keep their decoder layers; tried before the generic search (:func:`decoder_layers`).
KNOWN_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.layers",
                     "transformer.blocks", "model.language_model.layers", "language_model.model.layers")

#: MLP layouts whose intermediate units can be sliced: (projections into the intermediate units, projections out).
#: gate/up/down: llama, qwen2, qwen3, mistral, gemma, olmo, granite, ...; c_fc/c_proj: gpt2 (Conv1D, weights
#: stored [in, out]); fc1/fc2: opt, phi; dense_h_to_4h/dense_4h_to_h: gpt_neox.
MLP_LAYOUTS = ((("gate_proj", "up_proj"), ("down_proj",)), (("c_fc",), ("c_proj",)), (("fc1",), ("fc2",)),
               (("dense_h_to_4h",), ("dense_4h_to_h",)))

#: The config keys that hold the MLP's intermediate size, by architecture family (gpt2: ``n_inner``, opt: ``ffn_dim``).
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")

#: :func:`fresh_student`'s portable override names -> candidate config keys (standard names; a config's
#: ``attribute_map`` turns them into its own, e.g. gpt2's ``n_layer``, ``n_embd``, ``n_head``, ``n_positions``).
PORTABLE_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",),
    "intermediate_size": INTERMEDIATE_KEYS,
    "context_length": ("max_position_embeddings",),
}


# ---- layer selection ---------------------------------------------------------------------------------------------


def kept_layers(n: int, depth: float) -> list[int]:
    """The teacher layers a student of ``depth`` keeps, evenly spaced, the first and the last always included.

    ``k = round_half_up(depth * n)``, at least 2 when ``n >= 2`` (so both ends are kept), and layer ``i < k`` of the
    student is teacher layer ``floor(i * (n - 1) / (k - 1))``. For ``depth = 0.5`` this is DistilBERT's every other
    layer with the last one swapped in: 4 -> [0, 3], 6 -> [0, 2, 5], 12 -> [0, 2, 4, 6, 8, 11]; ``depth = 1`` keeps all.
    """
    _check_share("depth", depth)
    if n <= 1:
        return list(range(n))
    k = min(n, max(2, int(depth * n + 0.5)))
    # (n - 1) / (k - 1) >= 1, so the floors are strictly increasing; integer arithmetic keeps them exact.
    return [i * (n - 1) // (k - 1) for i in range(k)]


def _check_share(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise InvalidSpec(f"{name} must be a number in (0, 1] (the share of the teacher's {_SHARE_OF[name]} kept), "
                          f"got {value!r}")


_SHARE_OF = {"depth": "decoder layers", "width": "MLP intermediate units"}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the model's decoder layers: a known path (``model.layers``, ``transformer.h``, ...)
    holding ``num_hidden_layers`` modules, else the one ModuleList of that length whose items share a class."""
    n = _text_config(model.config).num_hidden_layers
    modules = dict(model.named_modules())
    for path in KNOWN_LAYER_PATHS:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) == n:
            return path, found
    candidates = [(path, m) for path, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == n and n > 0
                  and len({type(layer) for layer in m}) == 1]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(path for path, _ in candidates) or "none"
    raise Unsupported(f"cannot find the decoder layers of this {model.config.model_type} model: expected one "
                      f"ModuleList of num_hidden_layers={n} modules of one class, found {found}")


# ---- derive ----------------------------------------------------------------------------------------------------


def derive_student(teacher: PreTrainedModel, *, depth: float = 0.5, width: float = 1.0) -> PreTrainedModel:
    """The teacher's architecture with the :func:`kept_layers` share ``depth`` of its decoder layers, every tensor
    copied from the teacher (embeddings, final norm, LM head, the kept layers whole).

    ``width`` < 1 keeps ``round_half_up(width * intermediate)`` MLP units per layer, those whose weights (the rows of
    the input projections and their biases, the column of the output projection) have the largest L2 norm, in their
    original order (llama, qwen2, mistral, gpt2 and the other :data:`MLP_LAYOUTS`; Unsupported otherwise). Hidden
    size and attention heads are kept: the residual stream must stay as wide as the copied embeddings.

    The teacher is only read. The student is built from a copy of the teacher's config (``num_hidden_layers``,
    per-layer lists such as ``layer_types``, ``max_window_layers``, the intermediate size updated), so its modules,
    layer indices (KV cache) and saved ``config.json`` agree; it is float32, on the CPU, in train mode.
    Note: gpt2's ``scale_attn_by_inverse_layer_idx`` (off by default) scales a kept layer by its new index.
    """
    _check_share("depth", depth)
    _check_share("width", width)
    config = copy.deepcopy(teacher.config)
    text = _text_config(config)
    if getattr(text, "is_heterogeneous", False):
        raise Unsupported(f"deriving a student from a heterogeneous (per-layer) {text.model_type} config")
    prefix, layers = decoder_layers(teacher)
    n = len(layers)
    keep = kept_layers(n, depth)

    state = teacher.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            if int(index) in keep:
                new_state[f"{prefix}.{keep.index(int(index))}.{rest}"] = value
        else:
            new_state[key] = value

    _select_per_layer_config(text, n, keep)
    if width < 1.0:
        _narrow_mlps(teacher, text, prefix, [layers[i] for i in keep], width, new_state)

    text.num_hidden_layers = len(keep)
    config.dtype = torch.float32
    with torch.device("cpu"):
        student = type(teacher)(config)
    student = student.to(torch.float32)
    try:
        student.load_state_dict(new_state, strict=True)
    except RuntimeError as exc:
        # A module whose shape or parameters depend on the depth or width in a way this recipe does not know.
        raise Unsupported(f"deriving a {text.model_type} student (depth {depth}, width {width}): the student built "
                          f"from the updated config does not take the teacher's weights: {error_summary(exc)}") from None
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train()


def _select_per_layer_config(text: PretrainedConfig, n: int, keep: list[int]) -> None:
    """Per-layer config entries follow the kept layers: lists of one entry per layer (``layer_types``,
    ``mlp_layer_types``, ...) are indexed by ``keep``; ``max_window_layers`` (qwen2: layers below it use full
    attention) becomes the number of kept layers below it."""
    for key, value in text.to_dict().items():
        per_layer = "layer" in key or key in INTERMEDIATE_KEYS  # some configs list an intermediate size per layer
        if per_layer and isinstance(value, (list, tuple)) and len(value) == n and key != "per_layer_config":
            try:
                setattr(text, key, type(value)(value[i] for i in keep))
            except AttributeError:  # a read-only property derived from other fields, recomputed from them
                pass
    window = getattr(text, "max_window_layers", None)
    if isinstance(window, int) and not isinstance(window, bool):
        text.max_window_layers = sum(1 for i in keep if i < window)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (gpt2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D"


def _find_mlp(layer: nn.Module) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """``(path inside the layer, input projections, output projections)`` of the first known MLP layout."""
    for path, module in layer.named_modules():
        children = dict(module.named_children())
        for ins, outs in MLP_LAYOUTS:
            if all(isinstance(children.get(name), nn.Linear) or _is_conv1d(children.get(name, nn.Identity()))
                   for name in ins + outs):
                return path, ins, outs
    return None


def _unit_axis(module: nn.Module, into: bool) -> int:
    """The weight axis indexing the intermediate units: Linear stores [out, in], Conv1D [in, out]."""
    return (0 if into else 1) if not _is_conv1d(module) else (1 if into else 0)


def _narrow_mlps(teacher: nn.Module, text: PretrainedConfig, prefix: str, kept: list[nn.Module], width: float,
                 new_state: dict[str, torch.Tensor]) -> None:
    """Slice every kept layer's MLP to its highest-norm intermediate units (in ``new_state``) and set the config's
    intermediate size. A unit's norm is the L2 norm of every weight and bias that touches it: in a gated MLP
    (down(act(gate x) * up x)) a unit contributes nothing when either side of it is small, and the norm of all its
    weights together is the usual cheap proxy for that contribution (magnitude pruning of whole neurons)."""
    key = next((k for k in INTERMEDIATE_KEYS if k in text.to_dict()), None)
    found = _find_mlp(kept[0])
    if key is None or found is None:
        layouts = "; ".join(f"{'/'.join(i)} -> {'/'.join(o)}" for i, o in MLP_LAYOUTS)
        raise Unsupported(f"width < 1 is not supported for {text.model_type}: it needs a dense MLP with one of the "
                          f"layouts {layouts} (nn.Linear or Conv1D) and an intermediate size in the config "
                          f"({', '.join(INTERMEDIATE_KEYS)}); use width 1.0 or a fresh student")
    if isinstance(text.to_dict()[key], (list, tuple)):
        raise Unsupported(f"width < 1 is not supported for {text.model_type}: its config lists one {key} per layer")
    path, ins, outs = found
    size = None
    for new_index, layer in enumerate(kept):
        if _find_mlp(layer) != found:
            raise Unsupported(f"width < 1 is not supported for {text.model_type}: its decoder layers do not all "
                              f"have the MLP {path or 'layer'}.{'/'.join(ins + outs)}")
        mlp = layer.get_submodule(path) if path else layer
        projections = [(name, mlp.get_submodule(name), True) for name in ins] + \
                      [(name, mlp.get_submodule(name), False) for name in outs]
        widths = {p.weight.shape[_unit_axis(p, into)] for _, p, into in projections}
        if len(widths) != 1:
            raise Unsupported(f"width < 1 is not supported for {text.model_type}: the MLP projections "
                              f"{'/'.join(ins + outs)} disagree on the intermediate size ({sorted(widths)})")
        m = widths.pop()
        size = max(1, int(width * m + 0.5))
        with torch.no_grad():
            score = torch.zeros(m, dtype=torch.float64, device=mlp.get_submodule(ins[0]).weight.device)
            for _, p, into in projections:
                axis = _unit_axis(p, into)
                w = p.weight.detach().to(torch.float64)
                score += w.pow(2).sum(dim=1 - axis)
                if into and getattr(p, "bias", None) is not None:
                    score += p.bias.detach().to(torch.float64).pow(2)
            # Stable sort: equal norms keep the lower index, so the choice is deterministic.
            units = torch.sort(torch.argsort(score, descending=True, stable=True)[:size]).values
        base = f"{prefix}.{new_index}." + (f"{path}." if path else "")
        for name, p, into in projections:
            axis = _unit_axis(p, into)
            w_key = f"{base}{name}.weight"
            new_state[w_key] = new_state[w_key].index_select(axis, units.to(new_state[w_key].device))
            b_key = f"{base}{name}.bias"
            if into and b_key in new_state:
                new_state[b_key] = new_state[b_key].index_select(0, units.to(new_state[b_key].device))
    setattr(text, key, size)


# ---- fresh --------------------------------------------------------------------------------------------------------


def fresh_student(teacher_config: PretrainedConfig, overrides: Mapping[str, Any]) -> PreTrainedModel:
    """A randomly initialised model of the teacher's architecture: the teacher's config (model_type, vocabulary,
    special token ids, everything else) with the :data:`PORTABLE_KEYS` overrides written to the architecture's own
    keys (gpt2: ``n_layer``, ``n_embd``, ``n_head``, ``n_inner``, ``n_positions``).

    A changed ``hidden_size`` or ``heads`` also sets ``head_dim`` (where the config has one) to hidden_size / heads;
    a changed ``layers`` repeats a uniform ``layer_types`` and lets the architecture recompute a mixed one. Unknown
    names, values that are not positive integers, a hidden size not divisible by the heads (or an odd head size
    under rotary embeddings), kv_heads not dividing heads, a key the architecture lacks (gpt2 has no kv_heads) ->
    InvalidSpec naming the key. The caller seeds torch; the model is float32, on the CPU, in train mode.
    """
    from transformers import AutoModelForCausalLM

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(PORTABLE_KEYS))
    if unknown:
        raise InvalidSpec(f"unknown student override {unknown[0]!r}: the portable names are "
                          f"{', '.join(PORTABLE_KEYS)}")
    text = _text_config(teacher_config)
    if text is not teacher_config:
        raise Unsupported(f"fresh students of composite ({teacher_config.model_type}) configs; use a text-only teacher")
    d = teacher_config.to_dict()
    attribute_map = getattr(teacher_config, "attribute_map", {}) or {}
    keys: dict[str, str] = {}
    for name, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidSpec(f"student override {name} must be a positive integer, got {value!r}")
        real = next((attribute_map.get(c, c) for c in PORTABLE_KEYS[name] if attribute_map.get(c, c) in d), None)
        if real is None:
            raise InvalidSpec(f"student override {name} does not apply to {teacher_config.model_type} (its config has "
                              f"no {' / '.join(PORTABLE_KEYS[name])})")
        keys[name] = real
        d[real] = value

    def effective(name: str) -> int | None:
        real = keys.get(name) or next((attribute_map.get(c, c) for c in PORTABLE_KEYS[name]
                                       if attribute_map.get(c, c) in d), None)
        return d.get(real) if real is not None else None

    hidden, heads, kv = effective("hidden_size"), effective("heads"), effective("kv_heads")
    if hidden is not None and heads:
        if hidden % heads:
            key = "hidden_size" if "hidden_size" in overrides else "heads"
            raise InvalidSpec(f"student override {key}: hidden_size {hidden} is not divisible by heads {heads}")
        if ("rope_parameters" in d or "rope_theta" in d) and (hidden // heads) % 2:
            key = "hidden_size" if "hidden_size" in overrides else "heads"
            raise InvalidSpec(f"student override {key}: rotary embeddings need an even head size, hidden_size "
                              f"{hidden} / heads {heads} = {hidden // heads}")
        if "head_dim" in d and ("hidden_size" in overrides or "heads" in overrides):
            d["head_dim"] = hidden // heads
    if kv is not None and heads and (kv > heads or heads % kv):
        key = "kv_heads" if "kv_heads" in overrides else "heads"
        raise InvalidSpec(f"student override {key}: kv_heads {kv} must divide heads {heads}")
    if "layers" in overrides and isinstance(d.get("layer_types"), list):
        types = d["layer_types"]
        d["layer_types"] = [types[0]] * overrides["layers"] if len(set(types)) == 1 else None
    d["dtype"] = "float32"
    try:
        config = type(teacher_config).from_dict(d)
        model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidSpec(f"student overrides {overrides} do not make a valid {teacher_config.model_type} model: "
                          f"{error_summary(exc)}") from None
    return model.to(torch.float32).train()


# ---- describe -----------------------------------------------------------------------------------------------------


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """``architecture`` (model_type), ``parameters`` (each shared tensor once), ``layers``, ``hidden_size``,
    ``heads``, ``kv_heads``, ``intermediate_size``, ``vocab_size``, ``context_length``, ``dtype`` (``"float32"``)."""
    text = _text_config(model.config)
    heads = getattr(text, "num_attention_heads", None)
    first = next(model.parameters(), None)
    return {
        "architecture": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "intermediate_size": intermediate_size(text),
        "vocab_size": getattr(text, "vocab_size", None),
        "context_length": getattr(text, "max_position_embeddings", None),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }


def intermediate_size(config: PretrainedConfig) -> int | None:
    """The MLP's intermediate size (gpt2's ``n_inner = None`` means 4 x hidden)."""
    d = config.to_dict()
    for key in INTERMEDIATE_KEYS:
        if key in d:
            value = d[key]
            if value is None and key == "n_inner":
                return 4 * config.hidden_size
            return value
    return None


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config (itself for a plain causal LM, the text part of a composite one)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config
