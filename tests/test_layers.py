"""Imports flow one way: app never imports torch or worker; the engine never imports the service."""

from __future__ import annotations

import subprocess
import sys

from tests.support.layering import forbidden_imports


def _modules_after(import_stmt: str) -> set[str]:
    code = f"import sys; {import_stmt}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_api_process_never_imports_torch():
    mods = _modules_after("import app.main")
    assert "torch" not in mods
    assert not any(m.split(".")[0] in ("worker", "engine") for m in mods)


SERVICE_PACKAGES = {"app", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery",
                    "kombu", "redis", "httpx"}


def test_no_engine_module_knows_of_http_sql_or_celery():
    """Every module of the engine is imported (its ``__init__`` is lazy and would hide them)."""
    modules, violations = forbidden_imports("engine", SERVICE_PACKAGES)
    assert len(modules) > 30, modules  # the walk really reached the engine's modules
    assert violations == {}


def test_the_layering_check_catches_an_injected_import(tmp_path):
    """The check above can fail: a forbidden import deep in a submodule, behind a lazy ``__init__``."""
    pkg = tmp_path / "fake_engine"
    (pkg / "phases").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "phases" / "__init__.py").write_text("")
    (pkg / "phases" / "clean.py").write_text("import json\n")
    (pkg / "phases" / "leaky.py").write_text("def f():\n    pass\n\nimport sqlalchemy  # noqa\n")
    modules, violations = forbidden_imports("fake_engine", SERVICE_PACKAGES, pythonpath=str(tmp_path))
    assert "fake_engine.phases.clean" in modules
    assert violations == {"fake_engine.phases.leaky": ["sqlalchemy"]}


def test_safezip_is_a_standard_library_leaf():
    """Both layers import it, so it may import nothing but the standard library."""
    before = {m.split(".")[0] for m in _modules_after("pass")}  # the interpreter's own (site, editable finders)
    after = {m.split(".")[0] for m in _modules_after("import safezip")}
    assert not after - before - set(sys.stdlib_module_names) - {"safezip"}


def test_the_job_spec_imports_pydantic_and_the_standard_library_only():
    """Both the API and the engine import it: no torch, no service package, nothing of either layer."""
    before = {m.split(".")[0] for m in _modules_after("pass")}
    after = {m.split(".")[0] for m in _modules_after("import jobspec")}
    extra = {m for m in after - before - set(sys.stdlib_module_names) if not m.startswith("_sysconfigdata")}
    assert extra <= {"jobspec", "pydantic", "pydantic_core", "typing_extensions", "annotated_types",
                     "typing_inspection"}, extra
