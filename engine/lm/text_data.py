"""Text datasets (format ``jsonl``) for generative LMs: the records, and the token blocks training reads.

One JSON object per line, all lines of one kind (the first line decides, every other line must match):

==========================  ===========================================================================
record                      what is trained on
==========================  ===========================================================================
``{"text"}``                documents, each followed by EOS, concatenated and packed into blocks of
                            ``max_seq_len`` tokens; every token is a target
``{"prompt", "completion"}`` prompt + completion + EOS, one sequence each (truncated / padded); the
                            completion's tokens are the targets
``{"messages": [...]}``      a chat (``role``, ``content``) rendered with the teacher tokenizer's chat
                            template; the assistant turns' tokens are the targets
``{"prompt"}``              prompts only: the input of a ``generate`` step; distilled on the prompt tokens
==========================  ===========================================================================

:func:`read_records` parses and checks the file with the standard library (the upload inspection runs it);
:func:`tokenize` turns records into :class:`TokenBlocks` with a tokenizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidDataset

KINDS = ("text", "prompt_completion", "messages", "prompt")
ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_RECORDS = 10_000_000


def _kind(record: dict) -> str | None:
    keys = set(record)
    if keys == {"text"}:
        return "text"
    if keys == {"prompt", "completion"}:
        return "prompt_completion"
    if keys == {"messages"}:
        return "messages"
    if keys == {"prompt"}:
        return "prompt"
    return None


def _check(record: Any, kind: str | None, line: int) -> str:
    where = f"line {line}"
    if not isinstance(record, dict):
        raise InvalidDataset(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    found = _kind(record)
    if found is None:
        raise InvalidDataset(f"{where}: keys {sorted(record)} are not a known record; use one of "
                             '{"text"}, {"prompt", "completion"}, {"messages": [...]}, {"prompt"}')
    if kind is not None and found != kind:
        raise InvalidDataset(f"{where}: a {found!r} record in a dataset of {kind!r} records (every line must have "
                             "the same keys as the first)")
    if found == "messages":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InvalidDataset(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InvalidDataset(f"{where}: messages[{i}] must be {{\"role\": str, \"content\": str}}")
            if m["role"] not in ROLES:
                raise InvalidDataset(f"{where}: messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InvalidDataset(f"{where}: a chat without an 'assistant' message has nothing to learn from")
    else:
        for key, value in record.items():
            if not isinstance(value, str):
                raise InvalidDataset(f"{where}: {key!r} must be a string")
        if found == "text" and not record["text"].strip():
            raise InvalidDataset(f"{where}: 'text' is empty")
    return found


def read_records(path: Path) -> tuple[str, list[dict]]:
    """(kind, records) of a jsonl file; blank lines are skipped. Raises :class:`InvalidDataset` naming the line."""
    kind: str | None = None
    records: list[dict] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidDataset(f"line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidDataset(f"line {number} is not valid JSON: {exc}") from None
            kind = _check(record, kind, number)
            records.append(record)
            if len(records) > MAX_RECORDS:
                raise InvalidDataset(f"more than {MAX_RECORDS} records")
    if kind is None:
        raise InvalidDataset("the file holds no records")
    return kind, records


def describe(path: Path) -> dict[str, Any]:
    """What the upload inspection stores: rows, whether there are targets to learn (labels), the record kind."""
    kind, records = read_records(path)
    chars = sum(len(json.dumps(r, ensure_ascii=False)) for r in records)
    return {"num_rows": len(records), "has_labels": kind != "prompt",
            "schema": {"records": kind, "characters": chars}}


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a seeded shuffle, ``fraction`` of the records (at least one) held out."""
    if len(records) < 2:
        raise InvalidDataset("a text dataset needs at least 2 records to hold some out (or give eval_dataset_id)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


@dataclass
class TokenBlocks:
    """Token sequences of one length. ``input_ids`` [N, L] int64; ``attention_mask`` [N, L] int64 (0 = padding);
    ``target_mask`` [N, L] bool: position t's token is a training target (predicted from positions < t)."""

    input_ids: Any
    attention_mask: Any
    target_mask: Any

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    def tokens(self) -> int:
        """Target tokens (what losses and perplexity average over)."""
        return int(self.target_mask[:, 1:].sum())

    def select(self, rows: Any) -> TokenBlocks:
        return TokenBlocks(self.input_ids[rows], self.attention_mask[rows], self.target_mask[rows])


def _chat_pieces(tok: Any, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """The chat's token ids in pieces, each marked whether it is an assistant turn: the template is rendered for
    each growing prefix of the messages, and the tokens a message adds belong to it."""
    pieces, done = [], []
    for i in range(len(messages)):
        ids = tok.apply_chat_template(messages[: i + 1], tokenize=True, add_generation_prompt=False)
        if hasattr(ids, "keys"):  # transformers 5 may answer a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
        if ids[: len(done)] != done:  # a template that rewrites earlier turns: take the whole chat as one piece
            return [(ids, True)]
        pieces.append((ids[len(done):], messages[i]["role"] == "assistant"))
        done = ids
    return pieces


def tokenize(tok: Any, kind: str, records: list[dict], max_seq_len: int) -> TokenBlocks:
    """Records → :class:`TokenBlocks` of length ``max_seq_len`` (see the module docstring for each kind)."""
    import torch

    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if kind == "messages" and not getattr(tok, "chat_template", None):
        raise InvalidDataset("a 'messages' dataset needs a tokenizer with a chat template; the teacher's has none")
    if kind == "text":
        stream: list[int] = []
        for r in records:
            stream.extend(tok(r["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
        n = len(stream) // max_seq_len
        if n == 0:
            raise InvalidDataset(f"the text holds {len(stream)} tokens, fewer than one block of max_seq_len "
                                 f"{max_seq_len}; lower max_seq_len or add text")
        ids = torch.tensor(stream[: n * max_seq_len], dtype=torch.long).view(n, max_seq_len)
        return TokenBlocks(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    rows, targets = [], []
    for r in records:
        if kind == "messages":
            pieces = _chat_pieces(tok, r["messages"])
        else:
            prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None:
                prompt = [tok.bos_token_id] + prompt
            pieces = [(prompt, kind == "prompt")]
            if kind == "prompt_completion":
                pieces.append((tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos], True))
        ids = [t for p, _ in pieces for t in p][:max_seq_len]
        mask = [m for p, m in pieces for _ in p][:max_seq_len]
        rows.append(ids)
        targets.append(mask)
    ids_t = torch.full((len(rows), max_seq_len), pad, dtype=torch.long)
    att = torch.zeros((len(rows), max_seq_len), dtype=torch.long)
    tgt = torch.zeros((len(rows), max_seq_len), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, targets)):
        ids_t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        att[i, : len(ids)] = 1
        tgt[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
    if not bool(tgt[:, 1:].any()):
        raise InvalidDataset(f"no target tokens within max_seq_len {max_seq_len}: the prompts fill the whole "
                             "sequence; raise max_seq_len")
    return TokenBlocks(ids_t, att, tgt)
