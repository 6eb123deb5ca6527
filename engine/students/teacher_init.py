"""``init: teacher``: copy the teacher's weights into a student where shapes and roles match.

Units (Linear / Conv / BatchNorm / embeddings / attention blocks) are aligned by role and order, the
first and last kept at the ends, and copied whole or restricted to the leading slice; a token-embedding
table narrower than the teacher's is projected onto its top principal directions. In the spirit of
DistilBERT's initialisation from the teacher (V. Sanh, L. Debut, J. Chaumond, T. Wolf, "DistilBERT, a
distilled version of BERT: smaller, faster, cheaper and lighter", NeurIPS EMC² Workshop 2019).

A bag-of-embeddings student of an *embedding* teacher is initialised from the teacher's outputs instead
(:func:`token_output_table`, :func:`init_bag_from_outputs`): each token's row is the teacher's embedding of
that token alone, and the head starts as the map that makes the student output the mean of those rows, as
Model2Vec distils a sentence encoder into static embeddings (S. Tulkens, T. van Dongen, "Model2Vec: Fast
State-of-the-Art Static Embeddings", 2024).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.values import InputInfo
from engine.errors import InvalidSpec, ShapeMismatch
from engine.students.common import _type_name


# ---- init: teacher -------------------------------------------------------------------------------

_KINDS = {"Linear": "linear", "Conv2d": "conv", "Conv1d": "conv", "BatchNorm1d": "bn", "BatchNorm2d": "bn",
          "Embedding": "embedding", "TransformerEncoderLayer": "encoder_layer",
          "MultiheadAttention": "attention", "LayerNorm": "norm"}


def _is_position(name: str) -> bool:
    return "pos" in name.lower().rsplit(".", 1)[-1] or "position" in name.lower()


def _plain_kind(module: nn.Module) -> str | None:
    """Role of a parameter-only leaf module (torch.export flattens modules to plain ``Module``)."""
    if any(True for _ in module.children()):
        return None
    params = dict(module.named_parameters(recurse=False))
    buffers = dict(module.named_buffers(recurse=False))
    w = params.get("weight")
    if w is None:
        return None
    if "running_mean" in buffers:
        return "bn"
    if w.dim() == 4 or w.dim() == 3:
        return "conv"
    if w.dim() == 2:
        return "linear" if "bias" in params else None
    return None


def _units(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Ordered (name, kind, module) of the modules weights can be copied between."""
    out: list[tuple[str, str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            kind = _KINDS.get(_type_name(child)) or (_plain_kind(child) if _type_name(child) == "Module" else None)
            if kind in ("attention", "norm"):
                continue
            if kind is not None:
                out.append((full, kind, child))
            else:
                walk(full + ".", child)

    walk("", model)
    return out


def _align(k: int, n: int, keep_ends: bool) -> list[tuple[int, int]]:
    """Pairs (student i, teacher j): identity when k == n; first/last kept and the middle by stride
    (``keep_ends``), else i <- i·(n // k) (DistilBERT: student layer i <- teacher layer 2i)."""
    if k == 0 or n == 0:
        return []
    if k == n:
        return [(i, i) for i in range(k)]
    if not keep_ends:
        stride = max(1, n // k)
        return [(i, i * stride) for i in range(k) if i * stride < n]
    pairs = [(0, 0)]
    if k >= 2:
        pairs.append((k - 1, n - 1))
    mid_s, mid_t = k - 2, n - 2
    if mid_s > 0 and mid_t > 0:
        stride = max(1, mid_t // mid_s)
        pairs += [(1 + i, 1 + i * stride) for i in range(mid_s) if i * stride < mid_t]
    return sorted(pairs)


def _copy_state(dst: nn.Module, src: nn.Module, prefix: str) -> list[str]:
    """Copy every tensor of ``src``'s state into ``dst`` when all names and shapes agree; else nothing."""
    d_state, s_state = dst.state_dict(), dict(src.state_dict())
    if set(d_state) != set(s_state) or any(tuple(d_state[k].shape) != tuple(s_state[k].shape) for k in d_state):
        return []
    with torch.no_grad():
        for k, v in d_state.items():
            v.copy_(s_state[k].to(v.dtype))
    return [f"{prefix}.{k}" for k in d_state]


def _top_basis(table: torch.Tensor, dim: int) -> torch.Tensor:
    """[dim, D] float64: the top-``dim`` right singular vectors of ``table`` [V, D] (uncentred PCA)."""
    _, _, vh = torch.linalg.svd(table.detach().to(torch.float64), full_matrices=False)
    return vh[:dim]


def project_embedding(table: torch.Tensor, dim: int) -> torch.Tensor:
    """[V, D] -> [V, dim] (dim < D): the table in the basis of its top-``dim`` right singular vectors
    (uncentred PCA), which keeps the most of the rows' energy and their inner products."""
    return (table.detach().to(torch.float64) @ _top_basis(table, dim).T).to(torch.float32)


#: Largest vocabulary whose tokens :func:`token_output_table` runs through the teacher one by one.
TOKEN_TABLE_MAX_VOCAB = 1 << 18
_TOKEN_TABLE_BATCH = 2048


def token_output_table(teacher: nn.Module, inputs: list[InputInfo], vocab: int, out_dim: int) -> torch.Tensor | None:
    """The teacher's output for every token alone: [vocab, out_dim] float32 on the CPU, or None where it
    cannot be had (a vocabulary over :data:`TOKEN_TABLE_MAX_VOCAB`, a teacher that fails on one-token
    rows or returns something else than finite [B, out_dim] rows).

    ``inputs`` are the data's inputs in the teacher's positional order: ``input_ids`` [B, L] and optionally
    an ``attention_mask`` (given as ones); row v is the teacher on the sequence ``[v]``.
    """
    if vocab > TOKEN_TABLE_MAX_VOCAB:
        return None
    tensors = [*teacher.parameters(), *teacher.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    mask_dtype = torch.int64 if len(inputs) < 2 or inputs[1].is_integer else torch.float32
    rows: list[torch.Tensor] = []
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for start in range(0, vocab, _TOKEN_TABLE_BATCH):
                ids = torch.arange(start, min(vocab, start + _TOKEN_TABLE_BATCH), device=device).unsqueeze(1)
                args = [ids] if len(inputs) < 2 else [ids, torch.ones(ids.shape, dtype=mask_dtype, device=device)]
                out = teacher(*args)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != (ids.shape[0], out_dim):
                    return None
                rows.append(out.detach().float().cpu())
    except Exception:  # noqa: BLE001 - a teacher that cannot take one-token rows keeps the plain copy
        return None
    finally:
        teacher.train(was_training)
    table = torch.cat(rows)
    return table if bool(torch.isfinite(table).all()) else None


def init_bag_from_outputs(embedding: nn.Embedding, head: nn.Sequential, table: torch.Tensor) -> list[str]:
    """Set a bag student (``head(masked_mean(embedding(ids)))``, ``head`` = [Linear, ReLU]* Linear) so that
    it outputs the mean of ``table``'s rows [V, D_out] over the sequence's tokens; returns the set keys.

    The embedding holds the table's coordinates in its top-k basis B [k, D_out] (k = min(width, D_out),
    exact when k = D_out); the last Linear maps them back by Bᵀ. Hidden ReLU layers pass the coordinates
    through as their positive and negative parts (x = relu(x) − relu(−x)), which needs hidden widths of at
    least 2k, else the head keeps its fresh weights. Units and table columns beyond these keep their
    fresh weights, with zero weights out of them, so the initial function is exact and they still learn
    (the outgoing weights get gradients). Keys are relative: ``embedding.weight``, ``head.<i>.weight`` ...
    """
    linears = [(i, m) for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    width, out_dim = embedding.weight.shape[1], table.shape[1]
    k = min(width, out_dim)
    basis = _top_basis(table, k) if k < out_dim else torch.eye(out_dim, dtype=torch.float64)
    coords = (table.to(torch.float64) @ basis.T).to(embedding.weight.dtype)
    keys = ["embedding.weight"]
    with torch.no_grad():
        w = embedding.weight
        # extra columns: fresh, at the table's scale (Adam steps are then the same relative size everywhere)
        w.normal_(0.0, float(coords.pow(2).mean().sqrt()) or 1.0)
        w[:, :k].copy_(coords)
        hidden = [m.out_features for _, m in linears[:-1]]
        if any(h < 2 * k for h in hidden):
            return keys
        eye = torch.eye(k, dtype=w.dtype)
        top = basis.T.to(w.dtype)  # [D_out, k]
        carried = k  # leading input units holding the coordinates: k signed ones, then 2k (positive, negative)
        for n, (i, lin) in enumerate(linears):
            last = n == len(linears) - 1
            if last:
                lin.weight.zero_()
                lin.weight[:, :carried].copy_(top if carried == k else torch.cat([top, -top], 1))
            else:
                # the first 2k units carry relu(x), relu(-x); the others keep their fresh weights
                lin.weight[:2 * k].zero_()
                lin.weight[:2 * k, :carried].copy_(torch.cat([eye, -eye], 0) if carried == k
                                                   else torch.eye(2 * k, dtype=w.dtype))
                carried = 2 * k
            if lin.bias is not None:
                lin.bias[: None if last else 2 * k].zero_()
            keys += [f"head.{i}.weight"] + ([f"head.{i}.bias"] if lin.bias is not None else [])
    return keys


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy teacher weights into ``student`` where shape and role match; returns the copied state keys.

    * token embedding: the teacher's ``nn.Embedding`` with the same vocabulary; a wider table is
      projected to the student's width with :func:`project_embedding`; position tables share the
      first ``max_len`` rows when widths match;
    * Transformer encoder layers: student layer i <- teacher layer i·(n // k) (every other layer when
      the student has half the depth, the DistilBERT recipe), whole layers whose shapes all match;
    * Linear / Conv layers (outside encoder layers), in order: first <- first, last <- last, middle
      layers by stride; a BatchNorm that follows a copied layer in both models is copied with it.
    """
    s_units, t_units = _units(student), _units(teacher)
    copied: list[str] = []

    def by_kind(units, kinds):
        return [(n, m) for n, k, m in units if k in kinds]

    # embeddings
    s_emb = [(n, m) for n, m in by_kind(s_units, {"embedding"})]
    t_emb = [(n, m) for n, m in by_kind(t_units, {"embedding"})]
    t_tokens = [(n, m) for n, m in t_emb if not _is_position(n)]
    t_pos = [(n, m) for n, m in t_emb if _is_position(n)]
    with torch.no_grad():
        for name, m in s_emb:
            w = m.weight
            if _is_position(name):
                for _, tm in t_pos:
                    tw = tm.weight
                    if tw.shape[1] == w.shape[1]:
                        rows = min(w.shape[0], tw.shape[0])
                        w[:rows].copy_(tw[:rows].to(w.dtype))
                        copied.append(f"{name}.weight")
                        break
                continue
            for _, tm in t_tokens:
                tw = tm.weight
                if tw.shape[0] != w.shape[0]:
                    continue
                if tw.shape[1] == w.shape[1]:
                    w.copy_(tw.to(w.dtype))
                elif tw.shape[1] > w.shape[1]:
                    w.copy_(project_embedding(tw, w.shape[1]).to(w.dtype))
                else:
                    continue
                copied.append(f"{name}.weight")
                break

    # transformer layers
    s_layers, t_layers = by_kind(s_units, {"encoder_layer"}), by_kind(t_units, {"encoder_layer"})
    for i, j in _align(len(s_layers), len(t_layers), keep_ends=False):
        copied += _copy_state(s_layers[i][1], t_layers[j][1], s_layers[i][0])

    # linear / conv chains, each with the BatchNorm that follows it
    def weighted(units):
        out = []
        for idx, (n, k, m) in enumerate(units):
            if k in ("linear", "conv"):
                bn = None
                if idx + 1 < len(units) and units[idx + 1][1] == "bn":
                    bn = units[idx + 1]
                out.append((n, k, m, bn))
        return out

    for kind in ("conv", "linear"):
        s_w = [u for u in weighted(s_units) if u[1] == kind]
        t_w = [u for u in weighted(t_units) if u[1] == kind]
        for i, j in _align(len(s_w), len(t_w), keep_ends=True):
            got = _copy_state(s_w[i][2], t_w[j][2], s_w[i][0])
            copied += got
            if got and s_w[i][3] is not None and t_w[j][3] is not None:
                copied += _copy_state(s_w[i][3][2], t_w[j][3][2], s_w[i][3][0])
    return copied


def _teacher_module(teacher: Any) -> nn.Module | None:
    return None if teacher is None else getattr(teacher, "module", None)


def _teacher_vocab(teacher: Any) -> tuple[int, int] | None:
    """(num_embeddings, dim) of the teacher's token-embedding table, when there is one."""
    module = _teacher_module(teacher)
    if module is not None:
        for name, kind, m in _units(module):
            if kind == "embedding" and not _is_position(name):
                w = m.weight
                return int(w.shape[0]), int(w.shape[1])
    arch = getattr(teacher, "architecture", None) if teacher is not None else None
    if isinstance(arch, Mapping) and arch.get("vocab_size"):
        return int(arch["vocab_size"]), int(arch.get("embedding_dim", arch.get("d_model", 64)))
    return None


def _resolve_vocab(config_vocab: int | None, ids: InputInfo, teacher: Any, family: str) -> int:
    needed = None if ids.max_value is None else int(ids.max_value) + 1
    if config_vocab is not None:
        vocab = int(config_vocab)
    else:
        tv = _teacher_vocab(teacher)
        if tv is not None and (needed is None or tv[0] >= needed):
            vocab = tv[0]
        elif needed is not None:
            vocab = max(needed, 2)
        else:
            raise InvalidSpec(f"student.vocab_size: cannot infer the vocabulary for {family!r}; set it")
    if needed is not None and vocab < needed:
        raise ShapeMismatch(f"student.vocab_size is {vocab} but {ids.name!r} contains token id {needed - 1}",
        )
    return vocab
