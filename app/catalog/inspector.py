"""Run one of the engine's inspectors in a short-lived subprocess and read its one-line JSON verdict.

The API process never imports torch; a hostile or broken upload can crash or hang only the child,
which is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from app.errors import Unprocessable


def run_inspector(module: str, args: list[str], path: Path, timeout: float, *, error: type[Unprocessable],
                  what: str) -> dict:
    """``python -m <module> <args> <path>`` → its JSON result when ``ok``; else ``error`` saying why.

    ``what`` names the file in messages, e.g. "the onnx file".
    """
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args, str(path)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise error(f"inspecting {what} took longer than {timeout:.0f} s") from exc
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = {"ok": False, "error": f"the inspector crashed (exit {proc.returncode})"}
    if not result.get("ok"):
        raise error(f"{what} cannot be loaded: {result.get('error', 'unknown error')}")
    return result
