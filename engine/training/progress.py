"""Progress of a job's training: finished epochs in, ``reporter.progress`` dicts out."""

from __future__ import annotations

from engine.values import Reporter


class ProgressTracker:
    """Turns finished epochs into ``reporter.progress`` dicts.

    ``fraction`` counts epochs across all steps (and the baseline), so it reaches exactly 1.0
    after the last epoch; ``eta_seconds`` is mean epoch time times the epochs left.
    """

    def __init__(self, reporter: Reporter, total_epochs: int):
        self.reporter = reporter
        self.total_epochs = max(1, total_epochs)
        self.done_epochs = 0
        self.epoch_seconds: list[float] = []

    def skip(self, epochs: int) -> None:
        self.done_epochs += epochs

    def step_started(self, *, step_index: int, step_kind: str, epochs: int) -> None:
        """Announce a new step (also those without epochs, e.g. post-training quantization)."""
        remaining = self.total_epochs - self.done_epochs
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None
        self.reporter.progress({
            "step_index": step_index, "step_kind": step_kind, "epoch": 0, "epochs": epochs,
            # Work remains even when no epochs do (quantization, exports): 1.0 is reserved for the end.
            "fraction": min(self.done_epochs / self.total_epochs, 0.99),
            "eta_seconds": float(mean * remaining) if mean is not None and remaining > 0 else None,
        })

    def epoch_done(self, *, step_index: int, step_kind: str, epoch: int, epochs: int, seconds: float) -> None:
        self.done_epochs += 1
        self.epoch_seconds.append(seconds)
        remaining = self.total_epochs - self.done_epochs
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.reporter.progress(
            {
                "step_index": step_index,
                "step_kind": step_kind,
                "epoch": epoch,
                "epochs": epochs,
                "fraction": 1.0 if remaining <= 0 else self.done_epochs / self.total_epochs,
                "eta_seconds": float(mean * remaining) if remaining > 0 else 0.0,
            }
        )
