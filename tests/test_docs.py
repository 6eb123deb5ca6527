"""Every job example in docs/ is a valid job body (the docs say they work as written)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _examples() -> list[tuple[str, str]]:
    out = []
    for doc in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(re.findall(r"```json\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.name}#{i}", block))
    return out


@pytest.mark.parametrize("where,block", _examples(), ids=[w for w, _ in _examples()])
def test_job_examples_validate(where, block):
    from jobspec import JobSpec

    JobSpec.model_validate(json.loads(block))
