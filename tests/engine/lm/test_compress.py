"""Compression of Hugging Face causal LMs (engine/lm/compress.py): dynamic int8 quantization (held-out perplexity
kept, bytes shrunk, generate() works, the input untouched) and structured MLP pruning (exact slicing, checked against
an independent slicing here; save/load round-trip; the Wanda-style calibrated ranking beats random units)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from engine.errors import InvalidSpec, Unsupported
from engine.lm.compress import prune_mlp_channels, quantize_dynamic_int8, quantized_size_bytes
from engine.lm.text_data import TokenBlocks
from tests.support import lm

#: (input projections, output projection, parent path) of each test architecture's MLP, spelled out here rather than
#: taken from engine.lm.students so that the slicing below is independent of the code under test.
MLP = {"llama": (("gate_proj", "up_proj"), "down_proj", "model.layers.{}.mlp"),
       "qwen2": (("gate_proj", "up_proj"), "down_proj", "model.layers.{}.mlp"),
       "gpt2": (("c_fc",), "c_proj", "transformer.h.{}.mlp")}


#: One worker runs this module, so the model below is trained once per run, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("lm-compress")

@pytest.fixture(scope="module")
def trained(tok):
    """A briefly trained 4-layer Llama (150 steps, ~6 s on 2 cores) and the held-out / calibration documents."""
    train, held = lm.split_documents()
    return lm.train_teacher(tok, train, steps=150), train, held


def _calibration(tok, docs, n=32, seq_len=64):
    ids = lm.blocks(tok, docs, seq_len)
    ids = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))[:n]]
    return TokenBlocks(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))


def _slice(model, architecture, kept):
    """A model of ``model``'s class with only the ``kept[i]`` intermediate units of layer i: the config rebuilt with
    the smaller size, every weight copied from ``model``, the MLP weights sliced here (Linear rows [out, in] /
    columns; gpt2's Conv1D stores [in, out], so the axes swap)."""
    ins, out, parent = MLP[architecture]
    conv = architecture == "gpt2"
    config = copy.deepcopy(model.config)
    if conv:
        config.n_inner = len(kept[0])
    else:
        config.intermediate_size = len(kept[0])
    state = dict(model.state_dict())
    for i, units in enumerate(kept):
        units = torch.as_tensor(units)
        base = parent.format(i)
        for name in ins:
            state[f"{base}.{name}.weight"] = state[f"{base}.{name}.weight"][:, units] if conv else \
                state[f"{base}.{name}.weight"][units]
            if f"{base}.{name}.bias" in state:
                state[f"{base}.{name}.bias"] = state[f"{base}.{name}.bias"][units]
        state[f"{base}.{out}.weight"] = state[f"{base}.{out}.weight"][units] if conv else \
            state[f"{base}.{out}.weight"][:, units]
    sliced = type(model)(config)
    sliced.load_state_dict(state, strict=True)
    return sliced.eval()


# ---- dynamic int8 -------------------------------------------------------------------------------------------------


def test_dynamic_int8_keeps_perplexity_within_5_percent_and_shrinks_the_bytes(tok, trained):
    model, _, held = trained
    before = lm.state(model)
    q, facts = quantize_dynamic_int8(model)

    assert facts["linear_layers"] == 4 * 7 + 1 and facts["lm_head"] == "int8" and facts["conv1d_converted"] == 0
    float_ppl, int8_ppl = lm.perplexity(model, tok, held), lm.perplexity(q, tok, held)
    assert int8_ppl <= float_ppl * 1.05, (float_ppl, int8_ppl)

    # Float32 -> int8 + one float64 scale and int64 zero point per row: the Linear weights shrink about 3.3x here
    # (rows of 96 inputs), the float embeddings and norms stay.
    assert facts["bytes_before"] == sum(p.numel() * 4 for p in model.parameters())
    assert facts["bytes_after"] == quantized_size_bytes(q) < facts["bytes_before"] / 2.5
    # "As it would be stored": torch.save of the state dict holds those bytes plus pickle framing.
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    assert facts["bytes_after"] <= len(buffer.getvalue()) <= facts["bytes_after"] * 1.2

    # The caller's model is untouched: same weights, still float nn.Linear modules.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert type(q.model.layers[0].mlp.down_proj) is torch.ao.nn.quantized.dynamic.Linear


def test_the_quantized_model_generates_and_runs_forward(tok, trained, ids):
    model, _, _ = trained
    q, _ = quantize_dynamic_int8(model)
    float_logits, int8_logits = lm.logits(model, ids), lm.logits(q, ids)
    assert int8_logits.shape == float_logits.shape
    # Measured: ~7 % relative error, nearly all of it from the 7-bit per-tensor activations of the x86 kernels
    # (int8 per-channel weights alone: ~1 %); the top-1 token mostly agrees.
    assert (int8_logits - float_logits).norm() < 0.15 * float_logits.norm()
    assert (int8_logits.argmax(-1) == float_logits.argmax(-1)).float().mean() > 0.8

    prompt = ids[:, :8]
    out = q.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                     pad_token_id=tok.pad_token_id)
    assert out.shape == (2, 14) and torch.equal(out[:, :8], prompt)


def test_the_lm_head_can_stay_float(trained):
    model, _, _ = trained
    q, facts = quantize_dynamic_int8(model, quantize_head=False)
    assert facts["lm_head"] == "float (quantize_head=False)" and facts["linear_layers"] == 4 * 7
    assert type(q.lm_head) is nn.Linear


def test_gpt2_conv1d_layers_are_converted_and_its_tied_head_stays_float(tok, ids):
    model = lm.build_model(tok, "gpt2", layers=2).eval()
    q, facts = quantize_dynamic_int8(model)
    # 4 Conv1D per block (c_attn, attn c_proj, c_fc, mlp c_proj); quantizing the tied head would add an int8 copy of
    # the embedding matrix next to the float one.
    assert facts["conv1d_converted"] == 8 and facts["linear_layers"] == 8
    assert facts["lm_head"] == "float (tied to the input embeddings)"
    assert q.lm_head.weight is q.transformer.wte.weight
    assert facts["bytes_after"] < facts["bytes_before"]
    float_logits, int8_logits = lm.logits(model, ids), lm.logits(q, ids)
    assert (int8_logits - float_logits).norm() < 0.15 * float_logits.norm()
    assert q.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape == (2, 7)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"  # the input keeps its Conv1D layers


def test_a_model_without_linear_layers_is_unsupported():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

    with pytest.raises(Unsupported, match="no nn.Linear .*Embedding"):
        quantize_dynamic_int8(Bag())


# ---- MLP pruning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_half_the_units_are_pruned_exactly_and_round_trip(tok, ids, tmp_path, architecture):
    from transformers import AutoModelForCausalLM

    model = lm.build_model(tok, architecture, layers=2).eval()
    before = lm.state(model)
    pruned, facts = prune_mlp_channels(model, 0.5)

    assert facts["criterion"] == "weight_norm"
    assert facts["intermediate_before"] == 256 and facts["intermediate_after"] == 128
    assert facts["units_kept"] == [128, 128] and [len(k) for k in facts["kept_units"]] == [128, 128]
    key = "n_inner" if architecture == "gpt2" else "intermediate_size"
    assert getattr(pruned.config, key) == 128 and getattr(model.config, key) == 256
    assert facts["parameters_after"] == sum(p.numel() for p in pruned.parameters()) < facts["parameters_before"]
    # Each unit removed takes (2 in rows + 1 out column) x hidden weights (llama/qwen2) or 2 x hidden + 1 bias (gpt2).
    per_unit = 3 * 96 if architecture != "gpt2" else 2 * 96 + 1
    assert facts["parameters_before"] - facts["parameters_after"] == 2 * 128 * per_unit
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The kept units are the highest-norm ones (recomputed here) and the model equals one sliced here from them.
    ins, out, parent = MLP[architecture]
    for i, kept in enumerate(facts["kept_units"]):
        mlp = model.get_submodule(parent.format(i))
        axis_in, axis_out = (0, 1) if architecture == "gpt2" else (1, 0)
        score = sum(getattr(mlp, n).weight.pow(2).sum(axis_in) for n in ins) + getattr(mlp, out).weight.pow(2).sum(axis_out)
        if architecture == "gpt2":
            score = score + mlp.c_fc.bias.pow(2)
        assert kept == sorted(torch.topk(score, 128).indices.tolist())
    reference = _slice(model, architecture, facts["kept_units"])
    assert torch.allclose(lm.logits(pruned, ids), lm.logits(reference, ids), atol=1e-5, rtol=0)

    pruned.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert getattr(loaded.config, key) == 128
    assert torch.equal(lm.logits(loaded, ids), lm.logits(pruned, ids))


def test_amount_zero_keeps_every_unit(tok, ids):
    model = lm.build_model(tok, "llama", layers=2).eval()
    pruned, facts = prune_mlp_channels(model, 0.0)
    assert facts["intermediate_after"] == 256 and pruned is not model
    assert torch.equal(lm.logits(pruned, ids), lm.logits(model, ids))


def test_calibrated_ranking_differs_from_norms_and_beats_random_units(tok, trained):
    model, train, held = trained
    calibration = _calibration(tok, train)
    by_norm, norm_facts = prune_mlp_channels(model, 0.5)
    by_wanda, facts = prune_mlp_channels(model, 0.5, calibration=calibration)
    assert facts["criterion"] == "wanda" and facts["calibration_tokens"] == 32 * 64
    assert facts["intermediate_after"] == 128
    assert facts["kept_units"] != norm_facts["kept_units"]

    # The same model sliced from the reported units: the calibrated ranking only changes which units are kept.
    ids = calibration.input_ids[:2, :24]
    assert torch.allclose(lm.logits(by_wanda, ids), lm.logits(_slice(model, "llama", facts["kept_units"]), ids), atol=1e-5)

    wanda_ppl = lm.perplexity(by_wanda, tok, held)
    g = torch.Generator().manual_seed(0)
    random_ppl = [lm.perplexity(_slice(model, "llama", [sorted(torch.randperm(256, generator=g)[:128].tolist())
                                                        for _ in range(4)]), tok, held) for _ in range(2)]
    assert wanda_ppl < min(random_ppl), (wanda_ppl, random_ppl)


def test_padding_is_left_out_of_the_calibration(tok, trained):
    model, train, _ = trained
    calibration = _calibration(tok, train, n=4)
    padded = TokenBlocks(torch.cat([calibration.input_ids, torch.full_like(calibration.input_ids, tok.pad_token_id)], 1),
                         torch.cat([calibration.attention_mask, torch.zeros_like(calibration.attention_mask)], 1),
                         torch.cat([calibration.target_mask, torch.zeros_like(calibration.target_mask)], 1))
    _, plain = prune_mlp_channels(model, 0.5, calibration=calibration)
    _, with_padding = prune_mlp_channels(model, 0.5, calibration=padded)
    assert with_padding["calibration_tokens"] == plain["calibration_tokens"] == 4 * 64
    assert with_padding["kept_units"] == plain["kept_units"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "half", float("nan"), None])
def test_bad_amounts_are_invalid(tok, bad):
    model = lm.build_model(tok, "llama", layers=1)
    with pytest.raises(InvalidSpec, match="prune amount must be a number in \\[0, 1\\)"):
        prune_mlp_channels(model, bad)


def test_empty_calibration_is_invalid(tok):
    model = lm.build_model(tok, "llama", layers=1)
    empty = torch.zeros((0, 8), dtype=torch.long)
    with pytest.raises(InvalidSpec, match="calibration"):
        prune_mlp_channels(model, 0.5, calibration=TokenBlocks(empty, empty, empty.bool()))


def test_an_unknown_mlp_layout_is_unsupported(tok):
    model = lm.build_model(tok, "llama", layers=2)
    for layer in model.model.layers:
        layer.mlp = nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.Linear(256, 96))
    with pytest.raises(Unsupported, match="MLP pruning is not supported for llama: no known MLP"):
        prune_mlp_channels(model, 0.5)
    assert math.isfinite(float(lm.logits(model, torch.tensor([[1, 2, 3]])).sum()))  # the model itself still runs
