"""Multipart upload fields: the file's name, structured fields as JSON text, only the fields given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distillery_client._flow import FileSource


def upload_name(source: FileSource, filename: str | None) -> str:
    """The file name sent with an upload: the caller's, else the path's (or the file object's) last part."""
    if filename:
        return filename
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    return Path(str(name)).name if name else "upload"


def json_field(value: Any) -> str | None:
    """A structured form field (``architecture``, ``inputs``, ``options``) as the JSON text the API reads."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def form(**fields: Any) -> dict[str, str]:
    """Multipart text fields, without those left out (the server refuses unknown or empty ones)."""
    return {k: str(v) for k, v in fields.items() if v is not None}
