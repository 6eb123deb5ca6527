"""Run one of the engine's inspectors in a sandboxed executor and read its one-line JSON verdict.

Opening an upload (``torch.jit.load``, ``torch.export.load``, an ONNX parse, a parquet reader) can run the
tenant's code, so it never happens in the API process (which never imports torch) nor with its rights:
the inspector runs through :mod:`app.sandbox` — no network, an allow-listed environment (no database URL or
credentials), a read-only view of the system, the upload bound read-only at ``inputs/upload``, a private
scratch directory as its only writable place, and memory / wall-time / file-size limits.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from app import sandbox
from app.errors import Unprocessable
from app.settings import get_settings

#: The stored schema comes from the inspector (untrusted): its verdict line is capped before parsing.
MAX_VERDICT_BYTES = 256 * 1024


def run_inspector(module: str, args: list[str], path: Path, timeout: float, *, error: type[Unprocessable],
                  what: str) -> dict:
    """``python -m <module> <args> inputs/upload`` in the sandbox → its JSON result when ``ok``; else ``error``
    saying why (the inspector's own message, or the limit that stopped it).

    ``what`` names the file in messages, e.g. "the onnx file".
    """
    settings = get_settings()
    tmp_root = settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="inspect-", dir=tmp_root))
    try:
        limits = sandbox.Limits(memory_bytes=settings.inspect_memory_bytes, wall_seconds=timeout,
                                open_files=256, file_bytes=1024**3, scratch_bytes=1024**3)
        run = sandbox.run_to_end([sys.executable, "-m", module, *args, "inputs/upload"], scratch=scratch,
                                 inputs={"upload": path}, limits=limits, mode=sandbox.resolve_mode(settings.sandbox),
                                 secret_dirs=[settings.data_dir], max_line=MAX_VERDICT_BYTES)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcome = run.outcome
    if outcome.limit == "wall_time":
        raise error(f"inspecting {what} took longer than {timeout:.0f} s (DISTILLERY_INSPECT_TIMEOUT_SECONDS)")
    if outcome.limit is not None:
        raise error(f"inspecting {what} passed its {outcome.limit.replace('_', ' ')} limit "
                    f"({_limit_text(outcome.limit, settings.inspect_memory_bytes)})")
    result = run.last_json()
    if result is None:
        how = f"killed by {outcome.signal_name}" if outcome.signal is not None else f"exit {outcome.returncode}"
        result = {"ok": False, "error": f"the inspector crashed ({how})"}
    if not result.get("ok"):
        raise error(f"{what} cannot be loaded: {str(result.get('error', 'unknown error'))[:2000]}")
    return result


def _limit_text(limit: str, memory: int) -> str:
    if limit == "memory":
        return f"{memory / 2**30:.1f} GiB, DISTILLERY_INSPECT_MEMORY_BYTES"
    return "the inspection's fixed limits"

