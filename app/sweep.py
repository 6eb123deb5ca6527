"""Sweeps: remove what a killed process left behind in the data dir.

A process killed mid-request (``kill -9``, OOM, power loss) runs no ``finally``: its temp upload
(``data_dir/tmp/upload-*``), its inspection scratch (``data_dir/tmp/inspect-*``), a half-copied blob
(``*.partial``) or a blob whose row never committed stay on disk for good. So do a lost worker's
``data_dir/work/<job_id>`` and the checkpoints and artifacts of jobs that ended elsewhere.

What storage holds, by key family, and when each is an orphan:

``models/<id>``, ``datasets/<id>``
    no ``models`` / ``datasets`` row has the key.
``artifacts/<job_id>/<artifact_id>/<file>``
    no ``artifacts`` row has the key *and* the job has ended (or is gone): the worker writes the blobs
    of a running job before their rows, in the transaction that ends it.
``checkpoints/<job_id>/`` (and its ``.<job_id>.sync`` / ``.old`` siblings while a sync is under way)
    the job has ended or is gone; a queued or running job resumes from it.

Blobs are written before their rows, so nothing younger than ``DISTILLERY_SWEEP_ORPHAN_AGE_SECONDS`` (by
mtime, the newest in a directory) is ever taken for an orphan. Temp files, ``.partial`` files and
work dirs go after ``DISTILLERY_SWEEP_TEMP_AGE_SECONDS`` without a write. Anything else is left alone.

The sweep never follows a symlink (it neither descends into one nor removes one) and never touches a
path outside the data dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.clock import utcnow
from app.db.models import Artifact, Dataset, Job, Model
from app.jobs.state import ACTIVE
from app.settings import Settings
from app.storage import LocalStorage, Storage, storage_for
from app.storage.local import PARTIAL_SUFFIX

#: The scratch of an executor started before its job (worker/prestart.py, which replaces it after 6 h): a
#: directory with no job id, removed only once no live worker can still be holding it.
WAITING_PREFIX, WAITING_AGE = ".waiting-", 24 * 3600.0
log = logging.getLogger("distillery.sweep")

#: Name prefixes of what the API writes under ``data_dir/tmp`` (app.catalog.uploads, app.catalog.inspector).
TEMP_PREFIXES = ("upload-", "inspect-")
#: An upload's temp file is not written while it is inspected and copied into storage: it is kept at least
#: this long past the inspection timeout, whatever DISTILLERY_SWEEP_TEMP_AGE_SECONDS says.
INSPECT_MARGIN_SECONDS = 60.0
_CHUNK = 500  # ids per IN (...) query


@dataclass
class Swept:
    """What one kind of sweep removed."""

    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class SweepReport:
    """Counts and bytes removed per kind; ``errors`` counts paths that could not be removed."""

    temp: Swept = field(default_factory=Swept)  # data_dir/tmp/upload-*, inspect-*
    partial: Swept = field(default_factory=Swept)  # storage *.partial
    blob: Swept = field(default_factory=Swept)  # models/, datasets/, artifacts/ blobs no row references
    checkpoint: Swept = field(default_factory=Swept)  # checkpoints/<job_id> of ended or missing jobs
    work: Swept = field(default_factory=Swept)  # data_dir/work/<job_id> of ended or missing jobs
    errors: int = 0

    KINDS = ("temp", "partial", "blob", "checkpoint", "work")

    def kinds(self) -> dict[str, Swept]:
        return {k: getattr(self, k) for k in self.KINDS}

    @property
    def count(self) -> int:
        return sum(s.count for s in self.kinds().values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.kinds().values())

    def summary(self) -> str:
        parts = [f"{s.count} {k} ({_human(s.bytes)})" for k, s in self.kinds().items() if s.count]
        text = ", ".join(parts) or "nothing"
        return f"sweep removed {text}" + (f"; {self.errors} could not be removed" if self.errors else "")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# ---- the file system, without following links ----------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    path: Path
    is_dir: bool
    newest_mtime: float  # a directory's is the newest of everything in it
    size: int  # a directory's is the sum of its regular files


def _inside(root: Path, data_dir: Path) -> bool:
    """``root`` is a real directory (not a link) whose real path lies in the data dir."""
    try:
        if root.is_symlink() or not root.is_dir():
            return False
        real, base = root.resolve(), data_dir.resolve()
    except OSError:
        return False
    return real == base or base in real.parents


def _measure(path: Path) -> _Entry | None:
    """lstat ``path`` (a regular file or a directory, never a link); a directory is walked without following
    links. None when it is gone or is something else (a link, a socket)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return _Entry(path, False, st.st_mtime, st.st_size)
    if not stat.S_ISDIR(st.st_mode):
        return None
    newest, size = st.st_mtime, 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            try:
                sub = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            newest = max(newest, sub.st_mtime)
            if stat.S_ISREG(sub.st_mode):
                size += sub.st_size
    return _Entry(path, True, newest, size)


def _children(directory: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


def _files_under(directory: Path) -> Iterator[Path]:
    """Regular files under ``directory``; links are neither followed nor listed."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            p = Path(dirpath) / name
            try:
                if stat.S_ISREG(p.lstat().st_mode):
                    yield p
            except FileNotFoundError:
                continue


class _Remover:
    """Removes stale entries under the allowed roots and tallies them into a report."""

    def __init__(self, report: SweepReport, roots: list[Path], now: float):
        self.report, self.roots, self.now = report, [r.resolve() for r in roots], now

    def _allowed(self, path: Path) -> bool:
        # The parent is resolved (links above the entry were already refused); the entry itself is not,
        # so a link is judged by where it sits, and never removed (see _measure).
        try:
            parent = path.parent.resolve()
        except OSError:
            return False
        return any(parent == r or r in parent.parents for r in self.roots)

    def remove_if_older(self, path: Path, age: float, kind: str) -> bool:
        entry = _measure(path)
        if entry is None or self.now - entry.newest_mtime <= age or not self._allowed(path):
            return False
        try:
            if entry.is_dir:
                shutil.rmtree(path)  # never follows links (fd-based on Linux)
            else:
                path.unlink()
        except FileNotFoundError:
            return False  # another sweeper (another API process) was first
        except OSError as exc:
            self.report.errors += 1
            log.warning("sweep could not remove %s: %s", path, exc)
            return False
        getattr(self.report, kind).add(entry.size)
        return True


# ---- the database ---------------------------------------------------------------------------------------
def _chunks(items: Iterable[str]) -> Iterator[list[str]]:
    items = sorted(set(items))
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def _active_jobs(session: Session, job_ids: Iterable[str]) -> set[str]:
    """The ids among ``job_ids`` of jobs that exist and have not ended (queued, running, cancelling)."""
    active: set[str] = set()
    for chunk in _chunks(job_ids):
        active.update(session.scalars(select(Job.id).where(Job.id.in_(chunk), Job.status.in_(sorted(ACTIVE)))))
    return active


def _artifact_keys(session: Session, job_ids: Iterable[str]) -> set[str]:
    keys: set[str] = set()
    for chunk in _chunks(job_ids):  # artifacts.job_id is indexed
        keys.update(session.scalars(select(Artifact.storage_key).where(Artifact.job_id.in_(chunk))))
    return keys


def _checkpoint_job_id(name: str) -> str:
    """``job_x`` → ``job_x``; the sync's ``.job_x.sync`` / ``.job_x.old`` siblings → ``job_x``."""
    for suffix in (".sync", ".old"):
        if name.startswith(".") and name.endswith(suffix):
            return name[1:-len(suffix)]
    return name


# ---- the sweep ------------------------------------------------------------------------------------------
def sweep(session: Session, storage: Storage, settings: Settings, now: datetime | None = None) -> SweepReport:
    """Remove stale temp uploads, ``.partial`` files, orphan blobs, checkpoints and work dirs of ended jobs.

    ``storage`` must be a :class:`LocalStorage` whose root lies in ``settings.data_dir`` for the storage
    sweeps to run (another backend keeps no local files; its own lifecycle rules apply). ``session`` is only
    read from. Logs one line when anything was removed; returns what was removed per kind.
    """
    now_ts = (now or utcnow()).timestamp()
    report = SweepReport()
    data_dir = settings.data_dir
    temp_age = float(settings.sweep_temp_age_seconds)
    orphan_age = float(settings.sweep_orphan_age_seconds)
    upload_age = max(temp_age, settings.inspect_timeout_seconds + INSPECT_MARGIN_SECONDS)

    tmp_dir, work_dir = data_dir / "tmp", data_dir / "work"
    blob_root = storage.root if isinstance(storage, LocalStorage) else None
    roots = []
    for root in (tmp_dir, work_dir, blob_root):
        if root is not None and _inside(root, data_dir):
            roots.append(root)
        elif root is not None and (root.exists() or root.is_symlink()):
            log.warning("sweep skips %s: it is a link, or lies outside the data dir %s", root, data_dir)
    rm = _Remover(report, roots, now_ts)

    if tmp_dir in roots:
        for entry in _children(tmp_dir):
            if entry.name.startswith(TEMP_PREFIXES) and not entry.is_symlink():
                rm.remove_if_older(Path(entry.path), upload_age, "temp")

    if blob_root in roots:
        assert blob_root is not None
        _sweep_storage(session, blob_root, rm, temp_age, orphan_age, now_ts)

    if work_dir in roots:
        dirs = {e.name: Path(e.path) for e in _children(work_dir) if e.is_dir(follow_symlinks=False)}
        active = _active_jobs(session, dirs)
        for job_id, path in dirs.items():
            if job_id.startswith(WAITING_PREFIX):  # an executor waiting for its next job (worker/prestart.py)
                rm.remove_if_older(path, max(temp_age, WAITING_AGE), "work")
            elif job_id not in active:
                rm.remove_if_older(path, temp_age, "work")

    if report.count or report.errors:
        log.info("%s", report.summary())
    return report


def _sweep_storage(session: Session, root: Path, rm: _Remover, temp_age: float, orphan_age: float,
                   now_ts: float) -> None:
    # 1. Half-copied blobs, wherever put_file left them; a copy in progress keeps its mtime fresh.
    for path in _files_under(root):
        if path.name.endswith(PARTIAL_SUFFIX):
            rm.remove_if_older(path, temp_age, "partial")

    def old_files(directory: Path, recursive: bool = True) -> list[Path]:
        """Regular files (not ``.partial``) under ``directory`` past the grace period; its direct children
        only unless ``recursive``."""
        found = []
        paths = _files_under(directory) if recursive else (Path(e.path) for e in _children(directory))
        for path in paths:
            entry = _measure(path)
            if (entry is not None and not entry.is_dir and not path.name.endswith(PARTIAL_SUFFIX)
                    and now_ts - entry.newest_mtime > orphan_age):
                found.append(path)
        return found

    def key(path: Path) -> str:
        return path.relative_to(root).as_posix()

    # 2. Uploaded models and datasets. The candidates are listed before the rows are read: a row that
    # commits meanwhile is seen, and a blob younger than the grace period is no candidate at all.
    uploads = [p for family in ("models", "datasets") if not (root / family).is_symlink()
               for p in old_files(root / family, recursive=False)]
    if uploads:
        referenced = set(session.scalars(select(Model.storage_key))) | set(session.scalars(select(Dataset.storage_key)))
        for path in uploads:
            if key(path) not in referenced:
                rm.remove_if_older(path, orphan_age, "blob")

    # 3. Artifacts: the blobs of a job that has not ended may still be waiting for their rows.
    artifacts = root / "artifacts"
    if artifacts.is_dir() and not artifacts.is_symlink():
        job_dirs = {e.name: Path(e.path) for e in _children(artifacts) if e.is_dir(follow_symlinks=False)}
        active = _active_jobs(session, job_dirs)
        ended = {j: p for j, p in job_dirs.items() if j not in active}
        candidates = [p for p in ended.values() for p in old_files(p)]
        if candidates:
            referenced = _artifact_keys(session, ended)
            for path in candidates:
                if key(path) not in referenced:
                    rm.remove_if_older(path, orphan_age, "blob")
        for path in ended.values():
            _remove_empty_dirs(path)

    # 4. Checkpoints: a resume point for a queued or running job only.
    checkpoints = root / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        entries = {Path(e.path): _checkpoint_job_id(e.name) for e in _children(checkpoints) if not e.is_symlink()}
        active = _active_jobs(session, entries.values())
        for path, job_id in entries.items():
            if job_id not in active:
                rm.remove_if_older(path, orphan_age, "checkpoint")


def _remove_empty_dirs(top: Path) -> None:
    """rmdir the empty directories under (and including) ``top``, deepest first; links are left alone."""
    for dirpath, dirnames, _filenames in os.walk(top, topdown=False, followlinks=False):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _rmdir(p)
    _rmdir(str(top))


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:  # not empty, or gone
        pass


# ---- running it -----------------------------------------------------------------------------------------
def run_once(settings: Settings) -> SweepReport:
    """One sweep in its own unit of work (``distillery sweep``, and each pass of the API's sweeper)."""
    from app.db.session import session_scope

    with session_scope() as session:
        return sweep(session, storage_for(settings), settings, utcnow())


class Sweeper:
    """A daemon thread that sweeps once at once and then every ``interval`` seconds until stopped."""

    def __init__(self, settings: Settings, interval: float):
        self.settings, self.interval = settings, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="distillery-sweeper", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                run_once(self.settings)
            except Exception:  # a database blip must not end the sweeper; the next pass retries
                log.exception("sweep failed; retrying in %.0f s", self.interval)
            if self._stop.wait(self.interval):
                return

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)


def start_sweeper(settings: Settings) -> Sweeper | None:
    """Start the API's sweeper thread (the first sweep runs in it, so start-up does not wait for it).
    None when ``DISTILLERY_SWEEP_INTERVAL_SECONDS`` is 0 (sweeps then come from ``distillery sweep`` only)."""
    if settings.sweep_interval_seconds <= 0:
        return None
    sweeper = Sweeper(settings, float(settings.sweep_interval_seconds))
    sweeper.thread.start()
    return sweeper
