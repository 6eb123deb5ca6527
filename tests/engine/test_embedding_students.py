"""``embedding_bag`` with ``init: teacher`` distilled from a transformer sentence-embedding teacher (two inputs,
``input_ids`` + ``attention_mask``): the job must do as well as a plain training loop of the same student, and
better than a student that starts from scratch or from the teacher's raw token table."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import DatasetSource, TeacherSource, run
from engine.metrics import embedding_metrics
from engine.registry import students
from engine.values import InputInfo, TeacherInfo

from .helpers import RecordingReporter

V, L, D, TOPICS, MODS = 300, 16, 64, 10, 8


class Block(nn.Module):
    """A BERT layer written out (q/k/v/out/FFN Linears, post-norm), as a traced Hugging Face encoder looks."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(D, D) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.intermediate, self.output = nn.Linear(D, 128), nn.Linear(128, D)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape

        def heads(t):
            return t.view(b, n, 4, D // 4).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(h)), heads(self.value(h)),
                                           attn_mask=keep[:, None, None, :])
        h = self.norm1(h + self.out(a.transpose(1, 2).reshape(b, n, D)))
        return self.norm2(h + self.output(F.gelu(self.intermediate(h))))


class SentenceEncoder(nn.Module):
    """Sentence-transformer-like: BERT embeddings (std 0.02, LayerNorm), 2 blocks, masked mean pooling -> [B, D]."""

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(V, D)
        self.position_embeddings = nn.Embedding(L, D)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)
        self.norm = nn.LayerNorm(D)
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.norm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None])
        for layer in self.layers:
            h = layer(h, attention_mask != 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _texts(n: int, g: np.random.Generator):
    """Token ids [n, L] (0 = padding) from two topics per row plus modifier tokens 1..MODS that shift the topic
    of the next token; the labels are the shifted topics of the first and last content tokens (order matters,
    so a bag of words cannot match the teacher exactly)."""
    per = (V - 1 - MODS) // TOPICS
    t1, t2 = g.integers(0, TOPICS, n), g.integers(0, TOPICS, n)
    topic = np.where(g.random((n, L)) < 0.6, t1[:, None],
                     np.where(g.random((n, L)) < 0.7, t2[:, None], g.integers(0, TOPICS, (n, L))))
    ids = 1 + MODS + topic * per + g.integers(0, per, (n, L))
    ids = np.where(g.random((n, L)) < 0.4, g.integers(1, MODS + 1, (n, L)), ids)
    mask = (np.arange(L)[None] < g.integers(6, L + 1, n)[:, None]).astype(np.int64)
    ids = (ids * mask).astype(np.int64)
    content = np.where(ids > MODS, (ids - 1 - MODS) // per, -1)
    prev = np.concatenate([np.zeros((n, 1), np.int64), ids[:, :-1]], 1)
    shifted = np.where((prev >= 1) & (prev <= MODS), (content + prev) % TOPICS, content)
    first, last = np.argmax(shifted >= 0, 1), L - 1 - np.argmax((shifted >= 0)[:, ::-1], 1)
    rows = np.arange(n)
    return ids, mask, shifted[rows, first], shifted[rows, last]


def _train_teacher(ids, mask, y1, y2) -> SentenceEncoder:
    """A few seconds of SimCSE-style contrast (token-dropout views) plus the two topic labels."""
    torch.manual_seed(0)
    model, heads = SentenceEncoder(), nn.ModuleList([nn.Linear(D, TOPICS), nn.Linear(D, TOPICS)])
    opt = torch.optim.Adam([*model.parameters(), *heads.parameters()], lr=2e-3)
    ti, tm, y1, y2 = (torch.from_numpy(a) for a in (ids, mask, y1, y2))
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(ti), (128,), generator=g)
        m = tm[idx]
        e1 = model(ti[idx], m)
        e2 = model(ti[idx], m * (torch.rand(m.shape, generator=g) >= 0.2))
        nce = F.cross_entropy(F.normalize(e1, dim=1) @ F.normalize(e2, dim=1).T / 0.1, torch.arange(len(idx)))
        loss = 0.2 * nce + 0.5 * (F.cross_entropy(heads[0](e1), y1[idx]) + F.cross_entropy(heads[1](e1), y2[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


EPOCHS, BATCH, LR = 10, 64, 3e-3


@pytest.fixture(scope="module")
def sentence_teacher(tmp_path_factory):
    """(traced teacher, TeacherSource, DatasetSource with held-out rows, arrays, teacher outputs [N, D])."""
    g = np.random.default_rng(0)
    n, n_val = 1000, 500
    ids, mask, y1, y2 = _texts(n + n_val, g)
    teacher = _train_teacher(ids[:n], mask[:n], y1[:n], y2[:n])
    ti, tm = torch.from_numpy(ids), torch.from_numpy(mask)
    base = tmp_path_factory.mktemp("sentence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(teacher, (ti[:4], tm[:4]), check_trace=False)
    torch.jit.save(traced, str(base / "teacher.pt"))
    np.savez(base / "texts.npz", input_ids=ids[:n], attention_mask=mask[:n], input_ids_val=ids[n:],
             attention_mask_val=mask[n:])
    with torch.no_grad():
        outputs = teacher(ti, tm)
    return (traced, TeacherSource(base / "teacher.pt", "torchscript", task="embedding"),
            DatasetSource(base / "texts.npz", inputs=("input_ids", "attention_mask")), ti, tm, outputs, n)


def _plain_loop(model: nn.Module, ids, mask, targets) -> nn.Module:
    """The hand-written baseline: Adam, constant lr, 1 − cos, the job's epochs and batch size."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(ids), generator=g)
        for start in range(0, len(ids), BATCH):
            idx = perm[start:start + BATCH]
            loss = (1 - F.cosine_similarity(model(ids[idx], mask[idx]), targets[idx], dim=1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.slow  # trains a teacher, a whole job and three plain loops (~10 s)
def test_embedding_bag_from_a_transformer_teacher_matches_a_plain_loop(sentence_teacher, tmp_path):
    traced, teacher, data, ids, mask, outputs, n = sentence_teacher
    spec = {"teacher_model_id": "m", "dataset_id": "d", "student": {"family": "embedding_bag", "init": "teacher"},
            "steps": [{"kind": "distill", "loss": {"type": "cosine"}, "epochs": EPOCHS, "batch_size": BATCH,
                       "optimizer": {"type": "adam", "lr": LR}, "schedule": {"type": "constant"}}],
            "exports": [], "seed": 0}
    job = run(spec, teacher, data, tmp_path / "out", RecordingReporter(), device="cpu", threads=1)
    job_cosine = job.metrics["student"]["cosine"]

    infos = [InputInfo("input_ids", (L,), True, int(ids.max())), InputInfo("attention_mask", (L,), True, 1)]

    def plain(init: str, raw_table: bool = False) -> float:
        torch.manual_seed(0)
        model, _ = students.build({"family": "embedding_bag", "init": init}).create(
            infos, D, TeacherInfo(traced, None, "torchscript", "embedding"))
        if raw_table:  # what a hand-written loop does: the teacher's token table, a fresh head
            with torch.no_grad():
                model.embedding.weight.copy_(traced.word_embeddings.weight)
        model = _plain_loop(model, ids[:n], mask[:n], outputs[:n])
        with torch.no_grad():
            return embedding_metrics(model(ids[n:], mask[n:]), outputs[n:])["cosine"]

    same, scratch, raw = plain("teacher"), plain("random"), plain("random", raw_table=True)
    assert job_cosine >= same - 0.02, (job_cosine, same)
    assert job_cosine >= scratch + 0.1, (job_cosine, scratch)  # the initialisation matters, so this can fail
    # measured: job 0.829, same loop 0.829, raw table 0.801, scratch 0.631 (the raw-table init gave the job 0.801)
    assert job_cosine >= raw + 0.015, (job_cosine, raw)
    assert job.report["architecture"]["init_from_teacher"][0] == "embedding.weight"
