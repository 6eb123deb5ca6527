"""Checkpoint glue for ``run()``: the job's checkpoint identity, step-start student snapshots, resuming.

The file format and writing live in :mod:`.checkpoint`; this module decides what a job's
checkpoint must match (:func:`checkpoint_identity`), snapshots and rebuilds the student at step
starts (:class:`StudentSnapshots`) and restores a matching checkpoint into the job (:func:`resume`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.devices import is_cpu_only
from engine.training import checkpoint as ckpt_mod
from engine.report.rows import file_sha256, spec_sha256
from engine.pipeline.job import JobPlan
from engine.students.architecture import from_architecture
from engine.training.context import TrainContext
from engine.values import ArtifactFile, ModelSource, TeacherSource
from engine.pipeline.validate import Validated




class StudentSnapshots:
    """Snapshots of the student at step starts, and rebuilding one from a checkpoint.

    A student can be rebuilt when its architecture is the job's initial one with the initial
    state_dict layout (it is then loaded into the freshly created initial student), or when
    :func:`engine.students.architecture.from_architecture` builds a module with exactly its state_dict layout.
    """

    def __init__(self, initial: nn.Module, architecture: Mapping[str, Any], device: torch.device):
        self.initial = initial
        self.initial_arch = self._key(architecture)
        self.initial_sig = self._sig(initial)
        self.device = device
        self.built: dict[str, dict | None] = {}

    @staticmethod
    def _key(architecture: Any) -> str:
        return json.dumps(architecture, sort_keys=True, default=ckpt_mod._json_default)

    @staticmethod
    def _sig(model: nn.Module) -> dict[str, Any] | None:
        if is_cpu_only(model):
            return None
        try:
            return {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
        except Exception:  # noqa: BLE001
            return None

    def _built_sig(self, architecture: Any) -> dict | None:
        key = self._key(architecture)
        if key not in self.built:
            try:
                with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.built[key] = self._sig(from_architecture(architecture))
            except Exception:  # noqa: BLE001 - not rebuildable
                self.built[key] = None
        return self.built[key]

    def _target_sig(self, architecture: Any) -> dict | None:
        if self._key(architecture) == self.initial_arch:
            return self.initial_sig
        return self._built_sig(architecture)

    def snapshot(self, ctx: TrainContext, *, last: bool) -> dict[str, Any] | None:
        """The start of the next step (``last``: no step follows, the student is not needed), or None."""
        architecture = json.loads(self._key(ctx.architecture))
        if last:
            return {"architecture": architecture, "student": None, "rng": None}
        sig = self._sig(ctx.student)
        if sig is None or sig != self._target_sig(ctx.architecture):
            return None
        return {
            "architecture": architecture,
            "student": {
                "state": ckpt_mod.cpu_state(ctx.student),
                "frozen": [n for n, p in ctx.student.named_parameters() if not p.requires_grad],
                "training": bool(ctx.student.training),
            },
            "rng": ckpt_mod.rng_state(ctx.generator),
        }

    def rebuild(self, architecture: Any, saved: Mapping[str, Any]) -> nn.Module:
        """The module ``saved`` describes (raises ValueError when it cannot be rebuilt)."""
        state = saved["state"]
        sig = {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}
        if sig != self._target_sig(architecture):
            raise ValueError("the saved student does not fit its architecture")
        if self._key(architecture) == self.initial_arch:
            model = self.initial
        else:
            model = from_architecture(architecture)
        model.load_state_dict(state)
        frozen = set(saved["frozen"])
        for n, p in model.named_parameters():
            if p.is_floating_point():
                p.requires_grad_(n not in frozen)
        model.train(bool(saved["training"]))
        return model.to(self.device)


@dataclass
class Resume:
    """Where a resumed job continues: ``step`` (finished steps before it) and the ``epoch``
    completed in it, the finished steps' report rows and exports, and the step-start snapshot."""

    step: int
    epoch: int
    created_at: str
    rows: list[dict[str, Any]]
    artifacts: dict[int, list[ArtifactFile]]
    start: dict[str, Any] | None


def checkpoint_identity(spec: Mapping[str, Any], v: Validated, teacher: TeacherSource,
                         models: Mapping[str, ModelSource] | None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: format, engine code, torch, spec and input digests."""
    return {
        "format": ckpt_mod.FORMAT_VERSION,
        "engine_sha256": ckpt_mod.engine_code_sha256(),
        "torch": torch.__version__,
        "spec_sha256": spec_sha256(spec),
        "data_sha256": {k: s.sha256 or file_sha256(Path(s.path)) for k, s in sorted(v.sources.items())
                        if k in v.datasets},
        "teacher_sha256": teacher.sha256 or file_sha256(Path(teacher.path)),
        "models_sha256": {k: m.sha256 or file_sha256(Path(m.path)) for k, m in sorted((models or {}).items())},
    }


def resume(ckpts: ckpt_mod.JobCheckpoints, students: StudentSnapshots, job: JobPlan, ctx: TrainContext,
            out_dir: Path) -> Resume | None:
    """Restore the job state from ``checkpoint.pt`` when it matches; None (after a warning) when it does not."""
    loaded = ckpts.read()
    if loaded is None:
        return None
    meta, state = loaded["meta"], loaded["state"]
    try:
        n = len(job.steps)
        step, epoch = int(meta["step"]), int(meta["epoch"])
        if not 0 <= step <= n or int(meta["steps_total"]) != n or len(meta["rows"]) != step:
            raise ValueError(f"step {step} of {n} with {len(meta['rows'])} finished rows")
        architecture = meta["architecture"]
        start = None
        student = None
        if step < n:
            if state["student"] is None or state["rng"] is None:
                raise ValueError("no student saved")
            student = students.rebuild(architecture, state["student"])
            start = {"architecture": architecture, "student": state["student"], "rng": state["rng"]}
        ckpts.artifacts = list(meta["artifacts"])
        artifacts = ckpts.restore_artifacts(out_dir)
        if sorted(artifacts) != list(range(step)):
            raise ValueError("saved exports do not match the finished steps")
    except Exception as exc:  # noqa: BLE001 - an unusable checkpoint is ignored, never an error
        ckpts.artifacts = []
        ckpts._warn(f"ignoring a checkpoint that cannot be restored ({type(exc).__name__}: {str(exc)[:200]}); "
                    "starting over")
        return None
    if student is not None:
        ctx.student = student
    ctx.architecture = architecture
    ctx.history = list(meta["history"])
    ctx.step_info = {int(k): dict(val) for k, val in meta["step_info"]}
    ctx.progress.done_epochs = int(meta["progress"]["done_epochs"])
    ctx.progress.epoch_seconds = [float(x) for x in meta["progress"]["epoch_seconds"]]
    if state.get("fit") is not None and step < n:
        ckpts.pending_fit = (step, state["fit"])
    return Resume(step, epoch, str(meta.get("created_at", "?")), list(meta["rows"]), artifacts, start)
