"""Imports flow one way: app never imports torch or worker; the engine never imports the service."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(import_stmt: str) -> set[str]:
    code = f"import sys; {import_stmt}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_api_process_never_imports_torch():
    mods = _modules_after("import app.main")
    assert "torch" not in mods
    assert not any(m == "worker" or m.startswith("worker.") for m in mods)


def test_engine_knows_nothing_of_http_sql_or_celery():
    mods = _modules_after("import worker.engine")
    for forbidden in ("app", "fastapi", "sqlalchemy", "celery", "kombu", "pydantic", "starlette"):
        assert forbidden not in mods, forbidden


def test_safezip_is_a_standard_library_leaf():
    """Both layers import it, so it may import nothing but the standard library."""
    before = {m.split(".")[0] for m in _modules_after("pass")}  # the interpreter's own (site, editable finders)
    after = {m.split(".")[0] for m in _modules_after("import safezip")}
    assert not after - before - set(sys.stdlib_module_names) - {"safezip"}
