"""``client.artifacts``: a job's files — metadata and resumable, verified downloads (``/v1/artifacts``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx

from distillery_client._flow import Close, Flow, Read, Sleep
from distillery_client.errors import APIConnectionError, ChecksumMismatch
from distillery_client.resources._base import Resource, object_id
from distillery_client.types import Artifact

_HASH_BLOCK = 1 << 20


def destination(artifact: Artifact, path: str | os.PathLike[str] | None) -> Path:
    """Where ``download`` writes: ``path`` itself, or the artifact's file name inside ``path`` when that is a
    directory (the current one when None). Only the name's last part is used: a name is never a path."""
    target = Path(path) if path is not None else Path.cwd()
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        return target / (Path(artifact.filename).name or artifact.id)
    return target


def _sha256_of(path: Path) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest


class Artifacts(Resource):
    def retrieve(self, artifact_id: str | Artifact) -> Artifact:
        return self._run(self._call("GET", f"/v1/artifacts/{object_id(artifact_id)}", Artifact.from_dict))

    def download(self, artifact: str | Artifact, path: str | os.PathLike[str] | None = None) -> Path:
        """Stream the artifact's bytes to ``path`` (a file, or a directory to put its file name in; default the
        current directory) and return the file's path.

        The bytes go to ``<path>.part`` first. When that exists from an interrupted download, only the rest is
        asked for (``Range``, with ``If-Range`` = the artifact's ETag, so a changed artifact comes whole); a
        connection dropped mid-way resumes the same way. The result must hash to the artifact's sha256, else
        :class:`~distillery_client.ChecksumMismatch` (a stale partial is first retried once from scratch); only
        then is it renamed to ``path``."""
        return self._run(self._download(artifact, path))

    def _download(self, artifact: str | Artifact, path: str | os.PathLike[str] | None) -> Flow[Path]:
        art = artifact if isinstance(artifact, Artifact) else (yield from self._call(
            "GET", f"/v1/artifacts/{artifact}", Artifact.from_dict))
        dest = destination(art, path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        drops, resumed_from_disk = 0, part.exists()
        while True:
            try:
                digest = yield from self._fetch(art, part)
            except httpx.TransportError as exc:
                drops += 1
                if drops > self._policy.max_retries:
                    raise APIConnectionError(f"downloading {art.id}: the connection dropped {drops} times: "
                                             f"{type(exc).__name__}: {exc}") from exc
                yield Sleep(self._policy.backoff(drops - 1))
                continue
            if digest == art.sha256:
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            if not resumed_from_disk:
                raise ChecksumMismatch(art.id, art.sha256, digest)
            resumed_from_disk = False  # the partial on disk may have been another file's: once more, whole

    def _fetch(self, art: Artifact, part: Path) -> Flow[str]:
        """Bring ``part`` to the artifact's full size (what is on disk is kept); its sha256 (hex)."""
        have = part.stat().st_size if part.exists() else 0
        if have > art.size_bytes:
            part.unlink()
            have = 0
        if have == art.size_bytes and have:
            return _sha256_of(part).hexdigest()
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{art.sha256}"'} if have else {}
        response = yield from self._open(f"/v1/artifacts/{art.id}/content", headers=headers)
        if response.status_code != 206:
            have = 0  # the whole file came (the server ignored the range, or the artifact changed)
        digest = _sha256_of(part) if have else hashlib.sha256()
        with open(part, "ab" if have else "wb") as out:
            while chunk := (yield Read(response)):
                out.write(chunk)
                digest.update(chunk)
        yield Close(response)
        return digest.hexdigest()
