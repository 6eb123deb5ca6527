"""Checkpoints: let a new attempt of a job resume where a dead worker left off.

``run(..., checkpoint_dir=D)`` keeps one file, ``D/checkpoint.pt`` (written to a temporary
name and ``os.replace``-d, so it is always complete), plus copies of finished steps' exports in
``D/artifacts/``. A checkpoint describes the *start* of the step in progress (its student,
architecture and RNG states) and, inside ``distill`` steps, the training state after the last
completed epoch (student, optimizer, schedule, early stopping, hint adapters, RNG states). The
job-level state (finished steps' report rows and artifacts, metric history, progress counters)
comes with it.

What is saved, and loaded back with ``torch.load(..., weights_only=True)``: tensors, dicts,
lists, ints, floats, strings, booleans and None; everything that is not a tensor or an
optimizer's state is one JSON string (``meta``).

Resume rules (README "Checkpoints and resume"):

* a checkpoint is used only when its identity matches: format version, engine code, torch
  version, spec, datasets, teacher (and uploaded student models); anything else (different job,
  unreadable file, missing artifact copies) is ignored with a ``checkpoint`` warning event and the
  job starts over;
* a checkpoint is written only when the student at the start of the step in progress can be
  rebuilt: its architecture is the job's initial one, or one :func:`.students.from_architecture`
  rebuilds with the same state_dict keys and shapes. Quantized models (and ``pruned`` models that
  are not plain chains) cannot, so no checkpoint is written past such a step (the previous one
  stays and a new attempt repeats that step); once all steps are done the student is not needed;
* epoch-level checkpoints are written only inside ``distill`` steps; ``prune``/``quantize`` steps
  (their fine-tunes included) and the ``baseline`` restart from their beginning.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.values import ArtifactFile, Reporter

CHECKPOINT_FILE = "checkpoint.pt"
ARTIFACTS_DIR = "artifacts"
#: bump when the layout of checkpoint.pt changes
FORMAT_VERSION = 1


def has_checkpoint(checkpoint_dir: Path | str | None) -> bool:
    """True when ``checkpoint_dir`` holds a checkpoint file (it may still turn out not to match the job)."""
    return checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file()


def engine_code_sha256() -> str:
    """Digest of the engine's source files: a checkpoint never crosses a code change."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# RNG and module helpers


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """torch's global CPU (and CUDA) RNG state and the training generator's state."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# fit() state


def fit_state(*, model: nn.Module, hint_modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
              scheduler: Any, best: tuple[float, int, dict[str, torch.Tensor]] | None, bad_epochs: int,
              stopped: bool, epoch: int, lrs: Sequence[float], generator: torch.Generator) -> dict[str, Any]:
    """Everything :func:`.train.fit` needs to continue after ``epoch``."""
    return {
        "epoch": int(epoch),
        "stopped": bool(stopped),
        "model": cpu_state(model),
        "hints": [cpu_state(m) for m in hint_modules],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best": None if best is None else {"value": float(best[0]), "epoch": int(best[1]),
                                           "state": {k: v.detach().cpu().clone() for k, v in best[2].items()}},
        "bad_epochs": int(bad_epochs),
        "lr_first": float(lrs[0]) if lrs else None,
        "lr_last": float(lrs[-1]) if lrs else None,
        "rng": rng_state(generator),
    }


def restore_fit(state: Mapping[str, Any], *, model: nn.Module, hint_modules: Sequence[nn.Module],
                optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator,
                device: torch.device) -> dict[str, Any] | None:
    """Load a :func:`fit_state` into freshly built training objects; None (nothing changed) if it does not fit."""
    try:
        if signature(state["model"]) != signature(model.state_dict()):
            return None
        hints = list(state["hints"])
        if len(hints) != len(hint_modules) or any(signature(s) != signature(m.state_dict())
                                                  for s, m in zip(hints, hint_modules, strict=True)):
            return None
        groups = state["optimizer"]["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            return None
        best = state["best"]
        if best is not None and signature(best["state"]) != signature(model.state_dict()):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    model.load_state_dict(state["model"])
    for s, m in zip(hints, hint_modules, strict=True):
        m.load_state_dict(s)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], generator)
    lrs = [x for x in (state["lr_first"], state["lr_last"]) if x is not None]
    return {
        "epoch": int(state["epoch"]),
        "stopped": bool(state["stopped"]),
        "best": None if best is None else (float(best["value"]), int(best["epoch"]),
                                           {k: v.to(device) for k, v in best["state"].items()}),
        "bad_epochs": int(state["bad_epochs"]),
        "lrs": lrs,
    }


# ---------------------------------------------------------------------------------------------
# the job's checkpoints


class _Urgent:
    """A checkpoint asked for now (the worker is releasing the job): the next epoch end writes one whatever
    ``every`` says, and :attr:`written` turns True once it is on disk."""

    requested = False
    written = False


URGENT = _Urgent()


def request_checkpoint() -> None:
    URGENT.requested = True


class JobCheckpoints:
    """Reads and writes ``checkpoint.pt`` for one job; also the hook :func:`.train.fit` calls.

    The pipeline calls :meth:`begin_step` when a step starts (with the step-start snapshot or None
    when the student cannot be rebuilt), :meth:`step_done` when a step's exports are written, and
    keeps :attr:`rows` / :attr:`artifacts` current; ``fit`` calls :meth:`fit_resume` and
    :meth:`epoch_end`.
    """

    def __init__(self, directory: Path, every_seconds: float, identity: Mapping[str, Any], reporter: Reporter,
                 journal: Callable[[], Mapping[str, Any]]):
        self.dir = Path(directory)
        self.every = max(0.0, float(every_seconds))
        self.identity = dict(identity)
        self.reporter = reporter
        self.last_write = time.monotonic()
        #: what the job has recorded so far (history, step info, progress), read at every write
        self.journal = journal
        self.rows: list[dict[str, Any]] = []
        self.artifacts: list[dict[str, Any]] = []
        self.steps_total = 0
        self.step = 0
        self.start: dict[str, Any] | None = None  # {"architecture", "student", "rng"} of the step in progress
        self.pending_fit: tuple[int, dict[str, Any]] | None = None
        self.write_failed = False

    @property
    def path(self) -> Path:
        return self.dir / CHECKPOINT_FILE

    # -- reading ------------------------------------------------------------------------------
    def _warn(self, message: str, **data: Any) -> None:
        self.reporter.event("checkpoint", message, level="warning", data={"path": str(self.path), **data})

    def read(self) -> dict[str, Any] | None:
        """The checkpoint (``meta`` decoded) when one exists and matches this job, else None (with a warning)."""
        if not self.path.is_file():
            return None
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            meta = json.loads(raw["meta"])
            state = raw["state"]
            if not isinstance(meta, dict) or not isinstance(state, dict):
                raise ValueError("unexpected layout")
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is ignored, never an error
            self._warn(f"ignoring an unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); starting over")
            return None
        theirs = meta.get("identity") or {}
        if theirs != self.identity:
            differs = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
            self._warn(f"ignoring a checkpoint of a different job or engine (differs in {', '.join(differs)}); "
                       "starting over", differs=differs)
            return None
        missing = [a["name"] for a in meta.get("artifacts", []) if not (self.dir / ARTIFACTS_DIR / a["name"]).is_file()]
        if missing:
            self._warn(f"ignoring a checkpoint whose saved exports are missing ({', '.join(missing[:3])}); "
                       "starting over", missing=missing)
            return None
        return {"meta": meta, "state": state}

    def restore_artifacts(self, out_dir: Path) -> dict[int, list[ArtifactFile]]:
        """Copy the finished steps' saved exports into ``out_dir``; their ArtifactFiles by step."""
        out: dict[int, list[ArtifactFile]] = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        for a in self.artifacts:
            src = self.dir / ARTIFACTS_DIR / a["name"]
            dst = out_dir / a["name"]
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            out.setdefault(int(a["step_index"]), []).append(
                ArtifactFile(a["kind"], a["format"], dst, int(a["step_index"]), a["media_type"]))
        return out

    # -- hooks for fit ---------------------------------------------------------------------------
    def fit_resume(self, step_index: int) -> dict[str, Any] | None:
        """The saved training state of ``step_index`` (once), if the job resumes inside that step."""
        if self.pending_fit is None or self.pending_fit[0] != step_index:
            return None
        state = self.pending_fit[1]
        self.pending_fit = None
        return state

    def epoch_end(self, step_index: int, epoch: int, state: Callable[[], dict[str, Any]]) -> None:
        """After a finished epoch of a distill step: write a checkpoint when one is due."""
        if self.start is None or step_index != self.step:
            return
        if not URGENT.requested and time.monotonic() - self.last_write < self.every:
            return
        self._write(step_index, epoch, fit=state())
        URGENT.written = URGENT.requested

    # -- hooks for the pipeline -------------------------------------------------------------------
    def begin_step(self, index: int, start: dict[str, Any] | None) -> None:
        """Step ``index`` starts from ``start`` (None: its student cannot be rebuilt - no checkpoints)."""
        self.step = index
        self.start = start

    def step_done(self, index: int, files: Sequence[ArtifactFile], next_start: dict[str, Any] | None) -> None:
        """Step ``index`` and its exports are finished: save the exports and checkpoint the next step's start."""
        saved = self.dir / ARTIFACTS_DIR
        try:
            saved.mkdir(parents=True, exist_ok=True)
            for f in files:
                tmp = saved / f".{f.path.name}.tmp"
                shutil.copyfile(f.path, tmp)
                os.replace(tmp, saved / f.path.name)
        except OSError as exc:
            self._write_failed(exc)
            self.start = None
            return
        self.artifacts = [a for a in self.artifacts if a["step_index"] != index] + [
            {"kind": f.kind, "format": f.format, "name": f.path.name, "step_index": index, "media_type": f.media_type}
            for f in files]
        self.begin_step(index + 1, next_start)
        if next_start is not None:
            self._write(index + 1, 0, fit=None)

    # -- writing ---------------------------------------------------------------------------------
    def _write_failed(self, exc: BaseException) -> None:
        if not self.write_failed:
            self._warn(f"could not write a checkpoint ({type(exc).__name__}: {exc}); the job goes on without")
        self.write_failed = True

    def _write(self, step: int, epoch: int, *, fit: dict[str, Any] | None) -> None:
        assert self.start is not None
        journal = self.journal()
        now = time.time()
        meta = {
            "identity": self.identity,
            "created_at": _dt.datetime.fromtimestamp(now, _dt.UTC).isoformat(timespec="seconds"),
            "created_unix": now,
            "step": step,
            "epoch": epoch,
            "steps_total": self.steps_total,
            "rows": self.rows[:step],
            "artifacts": self.artifacts,
            "architecture": self.start["architecture"],
            "history": journal["history"],
            "step_info": [[int(k), v] for k, v in journal["step_info"].items() if int(k) < step],
            "progress": journal["progress"],
        }
        payload = {
            "meta": json.dumps(meta, default=_json_default),
            "state": {"student": self.start["student"], "rng": self.start["rng"], "fit": fit},
        }
        tmp = self.dir / f".{CHECKPOINT_FILE}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            self._write_failed(exc)
            return
        self.last_write = time.monotonic()
        # Said out loud: the supervisor copies the checkpoint to storage when it hears this (the engine's
        # sandbox cannot reach storage), so a lost worker's successor resumes from exactly here.
        self.reporter.event("checkpoint_saved", f"checkpoint saved at step {step}, epoch {epoch}", level="debug",
                            data={"step": step, "epoch": epoch})
