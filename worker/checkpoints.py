"""Training checkpoints in blob storage, so that a retried attempt on any worker resumes where the last one stopped.

Layout: ``checkpoints/<job id>/<attempt token>/checkpoint.pt`` plus the files beside it (finished steps'
exports under ``artifacts/``), one folder per attempt, so two attempts never write the same blobs. The newest
``checkpoint.pt`` of any attempt is where the next attempt resumes. The executor cannot reach storage: the
supervisor snapshots the executor's checkpoint dir (regular files only: a link or a special file planted by a
hostile executor is never followed) and pushes the snapshot. Within a push the other files go first and
``checkpoint.pt`` last, so storage never holds a checkpoint whose companion files are missing; files the
executor removed are deleted after it. The folder of a job is deleted after its attempt's guarded terminal
transition.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from app.storage import Storage, check_key, sha256_file

log = logging.getLogger("distillery.worker")

CHECKPOINT_FILE = "checkpoint.pt"
#: S3's limit on a key is 1024 bytes; names longer than any checkpoint needs are not pushed.
_MAX_NAME = 512


def job_folder(job_id: str) -> str:
    return f"checkpoints/{job_id}"


def latest(storage: Storage, job_id: str) -> str | None:
    """The token of the attempt whose ``checkpoint.pt`` was written last, if any attempt wrote one."""
    best: tuple[float, str] | None = None
    prefix = job_folder(job_id) + "/"
    for blob in storage.list(job_folder(job_id)):
        token, _, rest = blob.key[len(prefix):].partition("/")
        if rest == CHECKPOINT_FILE and (best is None or blob.modified > best[0]):
            best = (blob.modified, token)
    return best[1] if best else None


def delete_job(storage: Storage, job_id: str) -> None:
    storage.delete_folder(job_folder(job_id))


def copy_regular_files(src: Path, dst: Path) -> None:
    """Copy the regular files under ``src`` to ``dst`` (replacing it atomically); symlinks and specials are
    skipped, so a hostile executor's checkpoint dir can never make the supervisor read another file."""
    if not src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        return
    tmp = dst.with_name(f".{dst.name}.sync")
    shutil.rmtree(tmp, ignore_errors=True)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file() or name.endswith(".tmp"):
                continue
            shutil.copyfile(p, tmp / rel / name, follow_symlinks=False)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


class AttemptCheckpoints:
    """One attempt's checkpoints: restore the newest one (of any attempt) at start, push its own as they come.

    ``snapshot_dir`` is a directory of the supervisor's own, outside the executor's scratch."""

    def __init__(self, storage: Storage, job_id: str, token: str, snapshot_dir: Path):
        self.storage, self.job_id, self.token, self.snapshot_dir = storage, job_id, token, snapshot_dir
        self.folder = f"{job_folder(job_id)}/{token}"
        self.resume_token = latest(storage, job_id)
        self._pushed: dict[str, str] = {}  # relative name → sha256 of what storage holds for this attempt

    def restore(self, dst: Path) -> bool:
        """Download the newest checkpoint into ``dst`` (created empty when there is none). True when one was."""
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        if self.resume_token is None:
            return False
        prefix = f"{job_folder(self.job_id)}/{self.resume_token}/"
        for blob in self.storage.list(prefix.rstrip("/")):
            rel = Path(blob.key[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                continue  # keys are checked when written; a hand-made one cannot escape dst either
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            self.storage.get_file(blob.key, dst / rel)
        return True

    def push(self, src: Path) -> None:
        """Mirror the executor's checkpoint dir ``src`` into this attempt's folder (changed files only)."""
        copy_regular_files(src, self.snapshot_dir)  # ours now: the executor can no longer change or swap it
        files = {p.relative_to(self.snapshot_dir).as_posix(): p for p in sorted(self.snapshot_dir.rglob("*"))
                 if p.is_file()}
        order = sorted(files, key=lambda rel: (rel == CHECKPOINT_FILE, rel))  # checkpoint.pt last
        for rel in order:
            key = f"{self.folder}/{rel}"
            try:
                check_key(key)
            except ValueError:
                log.warning("checkpoint file %r has a name storage cannot hold; not pushed", rel[:100])
                continue
            if len(key) > _MAX_NAME:
                log.warning("checkpoint file name too long (%d); not pushed", len(key))
                continue
            digest, _ = sha256_file(files[rel])
            if self._pushed.get(rel) != digest:
                self.storage.put_file(key, files[rel])
                self._pushed[rel] = digest
        for rel in sorted(set(self._pushed) - set(files)):
            self.storage.delete(f"{self.folder}/{rel}")
            del self._pushed[rel]

    def delete_own(self) -> None:
        """Remove this attempt's folder (a fenced-out attempt whose job ended elsewhere)."""
        self.storage.delete_folder(self.folder)
