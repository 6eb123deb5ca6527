"""Students of Hugging Face causal LMs (engine/lm/students.py): derived from the teacher (the DistilBERT recipe:
kept layers copied exactly, MLPs narrowed to their highest-norm units) and fresh (portable size overrides)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidSpec, Unsupported
from engine.lm.students import decoder_layers, derive_student, describe, fresh_student, kept_layers
from tests.support import lm

ARCHITECTURES = ("llama", "qwen2", "gpt2")


def _reload(model, directory):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(directory, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)


# ---- layer selection ----------------------------------------------------------------------------------------------


def test_kept_layers_are_evenly_spaced_with_both_ends():
    assert kept_layers(6, 0.5) == [0, 2, 5]
    assert kept_layers(4, 0.5) == [0, 3]
    assert kept_layers(12, 0.5) == [0, 2, 4, 6, 8, 11]  # DistilBERT's every other layer, the last swapped in
    assert kept_layers(5, 0.5) == [0, 2, 4]  # 2.5 rounds half up
    assert kept_layers(8, 0.25) == [0, 7]
    assert kept_layers(4, 0.1) == [0, 3]  # never fewer than both ends
    assert kept_layers(1, 0.5) == [0]
    for n in (1, 4, 7):
        assert kept_layers(n, 1.0) == list(range(n))


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, True, "half", float("nan")])
def test_depth_and_width_outside_0_1_are_invalid(tok, bad):
    teacher = lm.build_model(tok, "llama", layers=2)
    with pytest.raises(InvalidSpec, match="depth"):
        derive_student(teacher, depth=bad)
    with pytest.raises(InvalidSpec, match="width"):
        derive_student(teacher, width=bad)


# ---- derive: depth ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("layers, kept", [(4, [0, 3]), (6, [0, 2, 5])])
def test_half_depth_keeps_the_documented_layers_with_the_teachers_weights(tok, ids, tmp_path, architecture, layers,
                                                                         kept):
    teacher = lm.build_model(tok, architecture, layers=layers).eval()
    before = lm.state(teacher)
    student = derive_student(teacher, depth=0.5)

    assert student is not teacher and type(student) is type(teacher)
    assert student.training and all(p.dtype == torch.float32 for p in student.parameters())
    assert student.config.num_hidden_layers == len(kept)
    if architecture == "gpt2":
        assert student.config.to_dict()["n_layer"] == len(kept)
    prefix, student_layers = decoder_layers(student)
    assert prefix == ("transformer.h" if architecture == "gpt2" else "model.layers") and len(student_layers) == len(kept)

    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            source = f"{prefix}.{kept[int(index)]}.{rest}"
        else:
            source = key  # embeddings, final norm, LM head
        assert torch.equal(value, t_state[source]), key
    assert len([k for k in s_state if k.startswith(prefix + ".0.")]) * len(kept) == \
        len([k for k in s_state if k.startswith(prefix + ".")])
    # KV-cache indices follow the new positions.
    assert [getattr(m, "layer_idx", i) for i, layer in enumerate(student_layers) for m in layer.modules()
            if hasattr(m, "layer_idx")] == list(range(len(kept)))

    # The teacher is untouched.
    assert teacher.config.num_hidden_layers == layers and not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())

    # The student trains and round-trips through save_pretrained / from_pretrained.
    loss = student.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    reloaded = _reload(student, tmp_path)
    assert reloaded.config.num_hidden_layers == len(kept)
    assert torch.equal(lm.logits(reloaded, ids), lm.logits(student, ids))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_full_depth_and_width_reproduce_the_teacher_exactly(tok, ids, architecture):
    teacher = lm.build_model(tok, architecture, layers=3)
    student = derive_student(teacher, depth=1.0, width=1.0)
    assert student.training
    assert torch.equal(lm.logits(student, ids), lm.logits(teacher, ids))


def test_per_layer_config_lists_follow_the_kept_layers(tmp_path, ids):
    from transformers import AutoModelForCausalLM, Qwen2Config

    # Layers at or above max_window_layers use sliding-window attention: a mixed layer_types.
    config = Qwen2Config(vocab_size=512, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, use_sliding_window=True, sliding_window=8,
                         max_window_layers=3)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    student = derive_student(teacher, depth=0.5)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 2, 5)] == \
        ["full_attention", "full_attention", "sliding_attention"]
    assert student.config.max_window_layers == 2  # kept layers 0 and 2 were below 3
    reloaded = _reload(student, tmp_path)
    assert reloaded.config.layer_types == student.config.layer_types
    assert torch.equal(lm.logits(reloaded, ids), lm.logits(student, ids))


def test_a_bfloat16_teacher_gives_a_float32_student(tok):
    teacher = lm.build_model(tok, "llama", layers=2).to(torch.bfloat16)
    student = derive_student(teacher, depth=1.0)
    assert teacher.dtype == torch.bfloat16 and describe(student)["dtype"] == "float32"
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight.float())


# ---- derive: width ------------------------------------------------------------------------------------------------


def _mlp_units(layer, architecture):
    """(intermediate-unit norms, {name: (teacher weight, unit axis)}) computed here independently."""
    mlp = layer.mlp
    if architecture == "gpt2":  # Conv1D: weights [in, out]
        parts = {"c_fc.weight": (mlp.c_fc.weight, 1), "c_fc.bias": (mlp.c_fc.bias, 0), "c_proj.weight": (mlp.c_proj.weight, 0)}
    else:
        parts = {"gate_proj.weight": (mlp.gate_proj.weight, 0), "up_proj.weight": (mlp.up_proj.weight, 0),
                 "down_proj.weight": (mlp.down_proj.weight, 1)}
    norms = sum(w.detach().double().pow(2).sum(dim=tuple(d for d in range(w.dim()) if d != axis))
                for w, axis in parts.values())
    return norms, parts


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "mistral"])
def test_half_width_keeps_the_highest_norm_units(tok, ids, tmp_path, architecture):
    if architecture == "mistral":
        from transformers import AutoModelForCausalLM, MistralConfig

        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(MistralConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64))
        inter = 64
    else:
        teacher, inter = lm.build_model(tok, architecture, layers=4, intermediate=256), 256
    student = derive_student(teacher, depth=0.5, width=0.5)
    assert describe(student)["intermediate_size"] == inter // 2
    key = "n_inner" if architecture == "gpt2" else "intermediate_size"
    assert student.config.to_dict()[key] == inter // 2

    t_layers, s_layers = decoder_layers(teacher)[1], decoder_layers(student)[1]
    arch = "gpt2" if architecture == "gpt2" else "gated"
    for s_index, t_index in enumerate([0, 3]):
        norms, parts = _mlp_units(t_layers[t_index], arch)
        units = torch.sort(torch.topk(norms, inter // 2).indices).values
        kept_norms, dropped = norms[units], norms[[i for i in range(inter) if i not in set(units.tolist())]]
        assert kept_norms.min() >= dropped.max()
        s_mlp = dict(s_layers[s_index].mlp.named_parameters())
        for name, (weight, axis) in parts.items():
            assert torch.equal(s_mlp[name], weight.index_select(axis, units)), name
        # Everything else in the layer is copied whole (biases of the output projection, attention, norms).
        t_params = dict(t_layers[t_index].named_parameters())
        for name, value in s_layers[s_index].named_parameters():
            if not (name.startswith("mlp.") and name[len("mlp."):] in parts):
                assert torch.equal(value, t_params[name]), name

    loss = student(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    reloaded = _reload(student, tmp_path)
    assert describe(reloaded)["intermediate_size"] == inter // 2
    assert torch.equal(lm.logits(reloaded, ids), lm.logits(student, ids))


def test_width_without_a_dense_mlp_is_unsupported():
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_local_experts=2))
    with pytest.raises(Unsupported, match=r"width < 1 is not supported for mixtral: it needs a dense MLP"):
        derive_student(teacher, width=0.5)
    assert describe(derive_student(teacher, depth=0.5))["layers"] == 2  # depth alone works for any decoder


# ---- fresh --------------------------------------------------------------------------------------------------------


SMALL = {"layers": 2, "hidden_size": 64, "heads": 2, "kv_heads": 1, "intermediate_size": 128, "context_length": 128}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fresh_student_applies_the_overrides(tok, ids, architecture):
    teacher = lm.build_model(tok, architecture, layers=4)
    overrides = {k: v for k, v in SMALL.items() if not (architecture == "gpt2" and k == "kv_heads")}
    torch.manual_seed(0)
    student = fresh_student(teacher.config, overrides)

    config = student.config.to_dict()
    if architecture == "gpt2":
        assert {k: config[k] for k in ("n_layer", "n_embd", "n_head", "n_inner", "n_positions")} == \
            {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_inner": 128, "n_positions": 128}
    else:
        assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                       "intermediate_size", "max_position_embeddings")} == \
            {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 128, "max_position_embeddings": 128}
    if architecture == "qwen2":
        assert config["layer_types"] == ["full_attention"] * 2
    # Same architecture, vocabulary and special tokens as the teacher.
    assert student.config.model_type == architecture and type(student) is type(teacher)
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(student.config, key) == getattr(teacher.config, key), key
    # As many parameters as the same model built directly.
    direct = lm.build_model(tok, architecture, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, context=128)
    assert describe(student)["parameters"] == sum(p.numel() for p in direct.parameters())
    assert describe(student) == {**describe(direct), "parameters": describe(student)["parameters"]}
    assert student.training and describe(student)["dtype"] == "float32"
    assert torch.isfinite(student(input_ids=ids, labels=ids).loss)


def test_fresh_student_is_seeded_by_the_caller(tok):
    config = lm.build_model(tok, "llama", layers=2).config
    torch.manual_seed(3)
    a = fresh_student(config, {"layers": 1})
    torch.manual_seed(3)
    b = fresh_student(config, {"layers": 1})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fresh_student_with_no_overrides_is_the_teachers_shape(tok):
    teacher = lm.build_model(tok, "qwen2", layers=2)
    assert describe(fresh_student(teacher.config, {})) == describe(teacher)


@pytest.mark.parametrize("architecture, overrides, key", [
    ("llama", {"depth": 2}, "depth"),  # not a portable name
    ("llama", {"hidden_size": 90}, "hidden_size"),  # 90 / 4 heads
    ("llama", {"heads": 5}, "heads"),  # 96 / 5
    ("llama", {"kv_heads": 3}, "kv_heads"),  # 4 heads / 3
    ("llama", {"heads": 8, "kv_heads": 16}, "kv_heads"),  # more kv heads than heads
    ("qwen2", {"hidden_size": 100}, "hidden_size"),  # head size 25: rotary embeddings need an even one
    ("qwen2", {"layers": 0}, "layers"),
    ("qwen2", {"layers": "2"}, "layers"),
    ("qwen2", {"context_length": 2.5}, "context_length"),
    ("gpt2", {"kv_heads": 1}, "kv_heads"),  # gpt2 has no grouped-query attention
    ("gpt2", {"hidden_size": 90}, "hidden_size"),
])
def test_bad_overrides_are_invalid_and_name_the_key(tok, architecture, overrides, key):
    config = lm.build_model(tok, architecture, layers=2).config
    with pytest.raises(InvalidSpec, match=key) as info:
        fresh_student(config, overrides)
    assert key in info.value.message


# ---- describe -----------------------------------------------------------------------------------------------------


def test_describe_reports_the_shape(tok):
    model = lm.build_model(tok, "gpt2", hidden=64, layers=3, heads=4, intermediate=128, context=96)
    assert describe(model) == {"architecture": "gpt2", "parameters": sum(p.numel() for p in model.parameters()),
                               "layers": 3, "hidden_size": 64, "heads": 4, "kv_heads": 4, "intermediate_size": 128,
                               "vocab_size": len(tok), "context_length": 96, "dtype": "float32"}
    # gpt2 ties the LM head to the token embeddings: counted once.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert describe(model)["parameters"] < sum(v.numel() for v in model.state_dict().values())
