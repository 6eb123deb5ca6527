"""The engine's archive check (defence in depth): :func:`safezip.check_zip` right before torch, numpy or PIL
read a zip, under the engine's own ceilings. The API already checked the upload under the deployment's
limits; this catches a file that reached a job another way, and refuses it with an :class:`EngineError`.
"""

from __future__ import annotations

import os
import zipfile

from safezip import UnsafeArchive, check_zip

from engine.errors import EngineError

#: The engine's ceilings: far above the API's defaults (DISTILLERY_MAX_ARCHIVE_*, enforced at upload), so an
#: operator who raises those still gets the files through, while a file that skipped the API cannot bomb a job.
ENGINE_MAX_TOTAL_BYTES = 64 * 1024**3
ENGINE_MAX_RATIO = 1000.0
ENGINE_MAX_MEMBERS = 1_000_000


def refuse_unsafe_zip(path: str | os.PathLike[str], code: str, what: str) -> list[zipfile.ZipInfo]:
    """:func:`check_zip` under the engine's ceilings. ``code`` is the EngineError code (``invalid_model``,
    ``invalid_dataset``), ``what`` names the file in the message. Returns the members' ZipInfo."""
    try:
        return check_zip(path, max_total_bytes=ENGINE_MAX_TOTAL_BYTES, max_ratio=ENGINE_MAX_RATIO,
                         max_members=ENGINE_MAX_MEMBERS)
    except UnsafeArchive as exc:
        raise EngineError(code, f"refusing {what}: {exc}") from None
