"""A trained generative teacher shared by the LM engine tests: a 4-layer Llama over a byte-level BPE vocabulary of
512 tokens, trained on the CPython documentation (tests/support/lm.py), saved and zipped as an upload would be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import lm


@dataclass(frozen=True)
class LMTeacher:
    tok: Any
    model: Any
    directory: Path
    zip: Path
    train_docs: list[str]
    held_docs: list[str]


@pytest.fixture(scope="session")
def lm_teacher(tmp_path_factory) -> LMTeacher:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, held = lm.split_documents()
    directory, archive = lm.shared_teacher(tmp_path_factory)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    return LMTeacher(tok, model, directory, archive, train, held)


@pytest.fixture(scope="module")
def tok():
    """The test tokenizer (byte-level BPE, 512 tokens), trained afresh (~0.5 s)."""
    return lm.tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    """Two rows of 24 token ids of real text."""
    return lm.blocks(tok, lm.documents(4), 24)[:2]
