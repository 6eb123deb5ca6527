"""Start untrusted work (upload inspection, a job's engine run) in an isolated child: the executor.

Everything that opens a tenant's file runs through :func:`spawn`. The child gets

* **no network and no view of the host**: with bubblewrap (``bwrap``, the sandbox Flatpak uses) it runs in
  its own user, network, PID, IPC, UTS and mount namespaces, with every capability dropped, seeing only a
  read-only system (``/usr``, the Python installation, the project's code) and its own scratch directory —
  never the data dir, other tenants' blobs, the SQLite file or the database socket;
* **no secrets**: an environment built from an allow-list (:func:`executor_env`), never inherited, so no
  ``DISTILLERY_DATABASE_URL``, broker URL or storage credentials;
* **limits**: address space, CPU time, open files and file size as rlimits; resident memory, wall time and
  scratch size watched by the trusted side, which kills the whole process group when one is passed.

``mode="process"`` (no bwrap) keeps the environment scrubbing, the scratch cwd, copies of the inputs and all
limits, but not the namespaces: the child could read what the service's user can read. ``auto`` picks bwrap
when it works and warns loudly otherwise. Standard library only: the API process uses this too.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("distillery.sandbox")

#: Environment variables passed through to the executor unchanged when set (device selection only).
PASS_THROUGH = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TZ")
#: Virtual address space is not resident memory: allocators and thread stacks reserve far more than they
#: touch, so RLIMIT_AS gets headroom on top of the memory budget; the RSS watch enforces the budget itself.
ADDRESS_SPACE_HEADROOM = 8 * 1024**3
STDERR_TAIL_BYTES = 16 * 1024
_POLL = 0.2
_PR_SET_PDEATHSIG = 1


class SandboxUnavailable(RuntimeError):
    """``DISTILLERY_SANDBOX=bwrap`` but bubblewrap is missing or cannot create namespaces here."""


@dataclass(frozen=True)
class Limits:
    """What one executor may use. ``memory_bytes`` is resident memory (summed over its processes)."""

    memory_bytes: int
    wall_seconds: float
    open_files: int = 1024
    file_bytes: int = 16 * 1024**3
    scratch_bytes: int | None = None
    cpu_seconds: int | None = None  # default: wall time × CPUs (a runaway loop is stopped by the wall clock)


@dataclass(frozen=True)
class Outcome:
    """How an executor ended. ``limit`` names the limit that stopped it (``memory``, ``wall_time``, ``disk``,
    ``cpu_time``, ``file_size``); ``signal`` is set when a signal killed it; ``killed`` when we stopped it."""

    returncode: int | None
    signal: int | None
    limit: str | None
    killed: str | None
    stderr_tail: str

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"


@functools.lru_cache
def bwrap_works() -> bool:
    """True when ``bwrap`` is installed and can create the namespaces we ask for on this host."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:
        proc = subprocess.run([exe, *_system_binds(), "--unshare-all", "--die-with-parent", "--cap-drop", "ALL",
                               "--", "/bin/true"], capture_output=True, timeout=20, env={})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def resolve_mode(mode: str) -> str:
    """``auto`` → ``bwrap`` when it works, else ``process`` (with a loud warning); ``bwrap`` refuses to run
    without it."""
    if mode == "process":
        return "process"
    if bwrap_works():
        return "bwrap"
    if mode == "bwrap":
        raise SandboxUnavailable("DISTILLERY_SANDBOX=bwrap but bubblewrap is not installed or cannot create "
                                 "namespaces here; install the 'bubblewrap' package or set DISTILLERY_SANDBOX=process")
    log.warning("SANDBOX DEGRADED: bubblewrap (bwrap) is not available, so uploads and jobs run as plain child "
                "processes (scrubbed environment and rlimits, but they can read what this service's user can "
                "read). Install 'bubblewrap' for real isolation (docs/security.md).")
    return "process"


def _system_binds() -> list[str]:
    """Read-only binds of the system: /usr, the /bin,/lib… links or dirs, the few /etc files programs need."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(top)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), top]
        elif p.is_dir():
            args += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/passwd",
                "/etc/group", "/etc/nsswitch.conf", "/etc/localtime", "/etc/fonts", "/etc/mime.types"):
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    return args


def _code_dirs() -> list[Path]:
    """The Python installation and this project's packages, which the executor imports (read-only)."""
    dirs = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}
    for pkg in ("app", "worker", "engine", "jobspec", "safezip"):
        # find_spec locates a top-level package without importing it (the API must not import the worker).
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            dirs.update(Path(p).resolve() for p in spec.submodule_search_locations)
    # Drop directories already inside another one (bwrap would bind twice).
    return sorted(d for d in dirs if not any(o != d and o in d.parents for o in dirs))


def _gpu_nodes() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


def _device_binds() -> list[str]:
    """GPUs: the NVIDIA device nodes and the driver's /proc and /sys entries, when the host has them."""
    nodes = _gpu_nodes()
    if not nodes:
        return []
    args: list[str] = []
    for n in nodes:
        args += ["--dev-bind", n, n]
    for extra in ("/sys", "/proc/driver/nvidia"):
        if os.path.exists(extra):
            args += ["--ro-bind", extra, extra]
    return args


def executor_env(scratch: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The executor's whole environment: an allow-list, never the service's (no database, broker or storage
    credentials; no ``DISTILLERY_*`` at all)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLCONFIGDIR": str(scratch / "tmp" / "matplotlib"),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "tmp" / "inductor"),
    }
    env.update({k: os.environ[k] for k in PASS_THROUGH if k in os.environ})
    env.update(extra or {})
    return env


def _hidden_paths(binds: list[Path], secret_dirs: list[Path]) -> list[str]:
    """A ``--tmpfs`` over every secret directory that lies inside a bound one (e.g. a data dir in the repo)."""
    args: list[str] = []
    for secret in secret_dirs:
        secret = secret.resolve()
        if any(secret == b or b in secret.parents for b in binds):
            args += ["--tmpfs", str(secret)]
    return args


def bwrap_argv(argv: list[str], scratch: Path, inputs: dict[str, Path], secret_dirs: list[Path],
               inputs_later: bool = False) -> list[str]:
    """The ``bwrap`` command line: read-only system and code, ``scratch`` writable at its own path, each input
    bound read-only at ``scratch/inputs/<name>``, and nothing else. ``inputs_later``: ``scratch/inputs`` itself
    is bound read-only instead, for inputs the trusted side links into it after the start (an executor
    started before its job, :mod:`worker.prestart`)."""
    code = _code_dirs()
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--uid", "65534", "--gid", "65534",
            "--hostname", "executor", *_system_binds(),
            "--proc", "/proc", "--dev", "/dev", *_device_binds(), "--tmpfs", "/tmp", "--tmpfs", "/run"]
    # Code after the tmpfs mounts (bwrap applies them in order): an installation under /tmp stays visible.
    for d in code:
        args += ["--ro-bind", str(d), str(d)]
    args += _hidden_paths(code, secret_dirs)
    args += ["--bind", str(scratch), str(scratch)]
    if inputs_later:
        args += ["--ro-bind", str(scratch / "inputs"), str(scratch / "inputs")]
    for name, src in inputs.items():
        args += ["--ro-bind", str(Path(src).resolve()), str(scratch / "inputs" / name)]
    return [*args, "--chdir", str(scratch), "--", *_bound_interpreter(argv)]


def _bound_interpreter(argv: list[str]) -> list[str]:
    """``argv`` with this interpreter named by a path that exists inside the sandbox: the binds are resolved
    directories, so a venv reached through a symlinked directory (``.venv -> /elsewhere/venv``) would not be
    found there. Only the directory is resolved: the venv's own ``bin/python`` keeps its ``pyvenv.cfg``."""
    if argv and argv[0] == sys.executable:
        exe = Path(sys.executable)
        return [str(exe.parent.resolve() / exe.name), *argv[1:]]
    return argv


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel kills the child when the thread that started it dies — a killed worker
    must not leave its executor running (bwrap adds --die-with-parent for what runs inside it)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's process-group kill still applies
        pass


def _rlimits(limits: Limits) -> list[tuple[int, int]]:
    """The rlimits of an executor. No address-space limit where GPUs are present: the CUDA driver reserves
    far more virtual memory than any budget (the resident-memory watch still applies)."""
    cpu = limits.cpu_seconds or int(limits.wall_seconds * (os.cpu_count() or 1)) + 60
    values = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NOFILE, limits.open_files),
              (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_CORE, 0)]
    if not _gpu_nodes():
        values.append((resource.RLIMIT_AS, limits.memory_bytes + ADDRESS_SPACE_HEADROOM))
    return values


def _set_limits(rlimits: list[tuple[int, int]]) -> None:
    """Runs in the child between fork and exec (so it applies to bwrap and everything it starts); computed
    before the fork, because little is safe to do between fork and exec."""
    _die_with_parent()
    for res, value in rlimits:
        resource.setrlimit(res, (value, value))


def stage_inputs(scratch: Path, inputs: dict[str, Path], mode: str) -> None:
    """Create ``scratch/inputs``: mount points for bwrap's read-only binds, or copies in process mode."""
    folder = scratch / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in inputs.items():
        dest = folder / name
        if mode == "bwrap":
            dest.touch()
        else:
            shutil.copyfile(src, dest)
            dest.chmod(0o444)


class Executor:
    """A running executor. Iterate :meth:`lines` for what it writes on stdout (each line capped at
    ``max_line`` bytes: a longer line kills it); :meth:`wait` for its :class:`Outcome`.

    ``waiting=True`` starts one before its job (:mod:`worker.prestart`): its stdin is a pipe the job's file name
    is written to (:meth:`begin`), its inputs are placed later (:meth:`place_inputs`), and its wall clock runs
    from :meth:`begin`, not from the start."""

    def __init__(self, argv: list[str], *, scratch: Path, inputs: dict[str, Path], limits: Limits, mode: str,
                 env: dict[str, str] | None = None, secret_dirs: list[Path] | None = None, max_line: int = 1 << 20,
                 waiting: bool = False):
        self.limits, self.mode, self.scratch, self.max_line = limits, mode, scratch, max_line
        (scratch / "tmp").mkdir(parents=True, exist_ok=True)
        stage_inputs(scratch, inputs, mode)
        full = bwrap_argv(argv, scratch, inputs, secret_dirs or [], inputs_later=waiting) if mode == "bwrap" else argv
        self.started: float | None = None if waiting else time.monotonic()
        self._killed: str | None = None
        self._limit: str | None = None
        self._ended = threading.Event()  # set by wait(): the watch stops at once, not at its next tick
        self._stderr: deque[bytes] = deque()
        self._stderr_size = 0
        self.proc = subprocess.Popen(full, cwd=scratch, env=executor_env(scratch, env),
                                     stdin=subprocess.PIPE if waiting else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=functools.partial(_set_limits, _rlimits(limits)), close_fds=True)
        self._threads = [threading.Thread(target=self._drain_stderr, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]
        for t in self._threads:
            t.start()

    # ---- an executor started before its job -----------------------------------------------------------
    def place_inputs(self, inputs: dict[str, Path]) -> None:
        """Make ``inputs`` visible at ``scratch/inputs/<name>`` as hard links (bwrap only: the directory is bound
        read-only, so the executor cannot change them; without the bind a process of the same user could change
        the cached original). Raises OSError (e.g. EXDEV: the inputs live on another file system) — then the
        caller starts a fresh executor instead."""
        if self.mode != "bwrap":
            raise OSError("inputs are placed after the start under bubblewrap only")
        for name, src in inputs.items():
            os.link(Path(src).resolve(), self.scratch / "inputs" / name)

    def begin(self, job_file: str) -> None:
        """Hand a waiting executor its job (the file name, relative to its scratch) and start its wall clock."""
        assert self.proc.stdin is not None
        self.started = time.monotonic()
        self.proc.stdin.write(job_file.encode() + b"\n")
        self.proc.stdin.close()

    # ---- what the executor says -------------------------------------------------------------------
    def lines(self) -> Iterator[bytes]:
        """Its stdout, line by line, until it closes it. A line over ``max_line`` bytes kills the executor."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline(self.max_line + 1)
            if not line:
                return
            if len(line) > self.max_line and not line.endswith(b"\n"):
                self.kill("protocol", limit=None)
                return
            yield line

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):  # type: ignore[union-attr]
            self._stderr.append(chunk)
            self._stderr_size += len(chunk)
            while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr) > 1:
                self._stderr_size -= len(self._stderr.popleft())

    # ---- the trusted side's limits -----------------------------------------------------------------
    def _watch(self) -> None:
        last_disk = 0.0
        while self.proc.poll() is None:
            now = time.monotonic()
            if self.started is not None and now - self.started > self.limits.wall_seconds:
                self.kill("limit", limit="wall_time")
            elif group_rss(self.proc.pid) > self.limits.memory_bytes:
                self.kill("limit", limit="memory")
            elif self.limits.scratch_bytes is not None and now - last_disk > 2.0:
                last_disk = now
                if tree_size(self.scratch) > self.limits.scratch_bytes:
                    self.kill("limit", limit="disk")
            if self._ended.wait(_POLL):
                return

    def kill(self, reason: str, *, limit: str | None = None) -> None:
        """Stop the executor and everything it started (its process group; bwrap's PID namespace dies with it)."""
        if self._killed is None:
            self._killed, self._limit = reason, limit
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> Outcome:
        rc = self.proc.wait(timeout)
        self._ended.set()
        # Whatever it started must not outlive it (process mode has no PID namespace).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for t in self._threads:
            t.join(timeout=2)
        sig = None
        if rc < 0:
            sig = -rc
        elif self.mode == "bwrap" and rc > 128:  # bwrap reports a child killed by signal N as 128 + N
            sig = rc - 128
        limit = self._limit
        if limit is None and sig == signal.SIGXCPU:
            limit = "cpu_time"
        if limit is None and sig == signal.SIGXFSZ:
            limit = "file_size"
        tail = b"".join(self._stderr).decode("utf-8", "replace")[-STDERR_TAIL_BYTES:]
        return Outcome(returncode=rc, signal=sig, limit=limit, killed=self._killed, stderr_tail=tail)


def spawn(argv: list[str], *, scratch: Path, inputs: dict[str, Path], limits: Limits, mode: str,
          env: dict[str, str] | None = None, secret_dirs: list[Path] | None = None,
          max_line: int = 1 << 20, waiting: bool = False) -> Executor:
    """Start ``argv`` (run with cwd ``scratch``) as an executor in ``mode`` (``bwrap`` | ``process``; resolve
    ``auto`` with :func:`resolve_mode` first). ``inputs`` are visible read-only at ``scratch/inputs/<name>``;
    ``secret_dirs`` (the data dir) are hidden even when they lie inside a bound code directory. ``waiting``:
    see :class:`Executor`."""
    return Executor(argv, scratch=scratch, inputs=inputs, limits=limits, mode=mode, env=env,
                    secret_dirs=secret_dirs, max_line=max_line, waiting=waiting)


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (Linux /proc; 0 elsewhere)."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # Fields after the command name (which may hold spaces): state ppid pgrp …; rss is field 24.
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


def tree_size(root: Path) -> int:
    """Bytes in the regular files under ``root`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total


@dataclass
class RunResult:
    """A short executor run read to the end (upload inspection): its stdout lines and how it ended."""

    outcome: Outcome
    lines: list[bytes] = field(default_factory=list)

    def last_json(self) -> dict | None:
        for line in reversed(self.lines):
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            return value if isinstance(value, dict) else None
        return None


def run_to_end(argv: list[str], *, scratch: Path, inputs: dict[str, Path], limits: Limits, mode: str,
               secret_dirs: list[Path] | None = None, max_lines: int = 1000, max_line: int = 1 << 20) -> RunResult:
    """Run an executor to completion, keeping at most ``max_lines`` of its stdout (lines of ``max_line`` bytes)."""
    ex = spawn(argv, scratch=scratch, inputs=inputs, limits=limits, mode=mode, secret_dirs=secret_dirs,
               max_line=max_line)
    kept: deque[bytes] = deque(maxlen=max_lines)
    for line in ex.lines():
        kept.append(line)
    return RunResult(outcome=ex.wait(), lines=list(kept))
