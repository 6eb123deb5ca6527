"""Every code the engine can raise is one class, documented in docs/errors.md, and relayed by the worker."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import engine.errors as errors

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "errors.md").read_text()


def _raised_codes() -> dict[str, list[str]]:
    """Codes raised anywhere in the engine: a subclass by name, or ``EngineError("<code>", …)`` literals."""
    classes = {cls.__name__: cls.code for cls in errors.ERROR_CLASSES}
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            code = None
            if node.func.id == "EngineError" and node.args and isinstance(node.args[0], ast.Constant):
                code = node.args[0].value
            elif node.func.id in classes:
                code = classes[node.func.id]
            if code is not None:
                found.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_raised_code_is_a_known_class():
    unknown = {code: where for code, where in _raised_codes().items() if code not in errors.ERROR_CODES}
    assert unknown == {}


def test_every_code_is_documented_with_its_class():
    for cls in errors.ERROR_CLASSES:
        assert re.search(rf"\| `{cls.code}` \| `{cls.__name__}` \|", DOC), f"{cls.code} missing from docs/errors.md"


def test_the_worker_relays_every_engine_code():
    from worker.supervisor import EXECUTOR_CODES

    assert set(errors.ERROR_CODES) <= EXECUTOR_CODES
    for code in EXECUTOR_CODES - set(errors.ERROR_CODES):
        assert f"| `{code}` |" in DOC, f"worker code {code} missing from docs/errors.md"


def test_a_subclass_carries_its_code_and_of_finds_the_class():
    err = errors.InvalidDataset("array 'x' has NaN")
    assert err.code == "invalid_dataset" and err.message == "array 'x' has NaN"
    assert isinstance(errors.EngineError.of("shape_mismatch", "m"), errors.ShapeMismatch)
    assert str(errors.TrainingDiverged("loss is nan")) == "training_diverged: loss is nan"
