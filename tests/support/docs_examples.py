"""The JSON job bodies the documentation shows (```json blocks in README.md and docs/*.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def job_examples() -> list[tuple[str, dict]]:
    """``(where, body)`` for every ```json block holding a job body (it names a teacher, uploaded or served)."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```json\n(.*?)```", doc.read_text(), re.S)):
            body = json.loads(block)
            if isinstance(body, dict) and ("teacher_model_id" in body or "teacher" in body):
                out.append((f"{doc.name}#{i}", body))
    return out
