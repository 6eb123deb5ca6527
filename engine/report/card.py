"""The job's human-facing extras: a Markdown model card and PNG plots.

* ``model_card.md`` (kind ``model_card``, format ``markdown``): the teacher (format, sha256,
  parameters), the recipe (the steps as given), the data hash, a metrics table per step, intended
  use and limits (held-out size, quantized-model CPU notes, a failed quality gate).
* ``training_curves.png`` (kind ``plot``): train loss and the held-out headline metric per epoch,
  one line per step; ``compression.png`` (kind ``plot``): size, batch-32 latency and the headline
  metric of the teacher and every step.

matplotlib draws on its Agg canvas (headless; pyplot is never imported).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.values import ArtifactFile

PNG = "image/png"
MARKDOWN = "text/markdown"


def _headline(task: str, row: Mapping[str, Any]) -> str:
    if task == "classification":
        return "accuracy" if "accuracy" in row else "agreement"
    if task == "regression":
        return "r2" if "r2" in row else "teacher_r2"
    return "cosine"


def _figure(width: float, height: float, columns: int) -> tuple[Any, Any]:
    """A figure with ``columns`` axes on the Agg canvas.

    ``matplotlib.figure.Figure`` with its canvas set directly, not ``pyplot``: pyplot's import (backend
    selection, the figure manager, the global state) costs more than drawing both plots, and nothing here
    needs a window or global state. Figures are freed with the last reference (no ``plt.close``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns)


def write_plots(history: Sequence[Mapping[str, Any]], teacher: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                out_dir: Path, task: str) -> list[ArtifactFile]:
    metric = _headline(task, teacher)
    files: list[ArtifactFile] = []
    trained = [h for h in history if not h.get("baseline")]
    if trained:
        fig, (ax1, ax2) = _figure(10, 3.8, 2)
        for step in sorted({int(h["step"]) for h in trained}):
            hs = [h for h in trained if int(h["step"]) == step]
            kind = next((r["kind"] for r in rows if r["index"] == step), "")
            label = f"step {step} {kind}"
            ax1.plot([h["epoch"] for h in hs], [h["train_loss"] for h in hs], marker=".", label=label)
            if any(metric in h for h in hs):
                ax2.plot([h["epoch"] for h in hs], [h.get(metric) for h in hs], marker=".", label=label)
        if metric in teacher:
            ax2.axhline(float(teacher[metric]), color="gray", linestyle="--", label="teacher")
        ax1.set(title="training loss", xlabel="epoch")
        ax2.set(title=f"held-out {metric}", xlabel="epoch")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        # fixed margins: tight_layout measures every text box and costs more than drawing the figure
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.91, wspace=0.2)
        path = Path(out_dir) / "training_curves.png"
        fig.savefig(path, dpi=90)
        files.append(ArtifactFile("plot", "png", path, None, PNG))

    labels = ["teacher"] + [f"{r['index']}:{r['kind']}\n{r['method']}" for r in rows]
    all_rows = [teacher, *rows]
    fig, axes = _figure(12, 3.8, 3)
    series = [("size (MB)", [r["size_bytes"] / 1e6 for r in all_rows]),
              ("latency batch 32 (ms, CPU)", [r["latency_ms"]["batch_32"] for r in all_rows]),
              (f"held-out {metric}", [float(r.get(metric, float("nan"))) for r in all_rows])]
    for ax, (title, values) in zip(axes, series):
        colors = ["#888888"] + ["#d9534f" if (r.get("gate") or {}).get("passed") is False else "#4a7ab8"
                                for r in rows]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.91, wspace=0.25)
    path = Path(out_dir) / "compression.png"
    fig.savefig(path, dpi=90)
    files.append(ArtifactFile("plot", "png", path, None, PNG))
    return files


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_model_card(report: Mapping[str, Any], spec: Mapping[str, Any], source: Any, v: Any, out_dir: Path,
                     failed: str | None = None) -> ArtifactFile:
    teacher = report["teacher"]
    rows = report["steps"]
    task = v.task
    repro = report["reproducibility"]
    data = report["data"]
    lines = ["# Model card", ""]
    if failed:
        lines += [f"> **Quality gate failed**: {failed}. The delivered model is the output of the last step that "
                  "passed (or none).", ""]
    lines += [
        "## Teacher", "",
        f"- format: `{source.format}`, task: {task}",
        f"- sha256: `{repro.get('teacher_sha256')}`",
        f"- parameters: {teacher['num_parameters']:,}, size {teacher['size_bytes']:,} bytes",
        "",
        "## Recipe", "",
        "```json",
        json.dumps({"student": spec.get("student"), "steps": spec.get("steps")}, indent=2, default=str),
        "```",
        "",
        "## Data", "",
        f"- data sha256: `{repro.get('data_sha256')}`",
        f"- training rows: {data.get('train_rows')}, held-out rows: {data.get('val_rows')} ({data.get('val_source')})",
        f"- inputs: {data.get('inputs')}",
        "",
        "## Results (held-out)", "",
    ]
    metric_cols = [k for k in ("accuracy", "agreement", "f1_macro", "r2", "mse", "cosine") if k in teacher]
    head = ["model", "parameters", "non-zero", "size (bytes)", "gzip (bytes)", "latency b1 / b32 (ms)", *metric_cols]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def line(name: str, r: Mapping[str, Any]) -> str:
        lat = r.get("latency_ms") or {}
        cells = [name, f"{r.get('num_parameters', 0):,}", _fmt(r.get("nonzero_parameters")), _fmt(r.get("size_bytes")),
                 _fmt(r.get("size_gzip_bytes")), f"{_fmt(lat.get('batch_1'), 3)} / {_fmt(lat.get('batch_32'), 3)}"]
        cells += [_fmt(r.get(k)) for k in metric_cols]
        return "| " + " | ".join(cells) + " |"

    lines.append(line("teacher", teacher))
    for r in rows:
        name = f"step {r['index']}: {r['kind']} {r['method']}"
        if (r.get("gate") or {}).get("passed") is False:
            name += " (gate failed)"
        lines.append(line(name, r))
    lines += ["", "## Intended use", "",
              f"A compressed stand-in for the teacher on the same inputs and {task} task, for CPU/GPU inference "
              "where the teacher is too large or slow. Validate it on your own data before relying on it.", "",
              "## Limits", "",
              f"- Metrics come from {data.get('val_rows')} held-out rows ({data.get('val_source')}); small held-out "
              "sets give coarse estimates (one row is "
              f"{100.0 / max(1, int(data.get('val_rows') or 1)):.2f} points).",
              "- The student imitates the teacher: it inherits the teacher's errors and biases; `agreement` "
              "measures how often it predicts what the teacher predicts."]
    for r in rows:
        q = r.get("quantization")
        if q:
            lines.append(f"- step {r['index']} ({r['method']}): {q.get('notes', '')}. {q.get('cpu_note', '')}.")
            for fmt, note in (q.get("export_notes") or {}).items():
                lines.append(f"  - {fmt}: {note}.")
        p = r.get("prune")
        if p and p.get("method") != "channel":
            lines.append(f"- step {r['index']} ({p['method']} pruning): {p.get('sparsity', 0):.1%} of the weights are "
                         "zeros in dense tensors; files shrink when compressed (see gzip), dense kernels do not run "
                         "faster.")
        ir = r.get("input_reduction")
        if ir:
            lines.append(f"- step {r['index']}: inputs are reduced {ir['in_features']} -> {ir['components']} "
                         f"({ir['method']}) inside the model; feed the original {ir['in_features']} features.")
    if report.get("gate"):
        g = report["gate"]
        if g.get("against") == "labels":
            lines.append(f"- quality gate: step {g['failed_step']} scored {g['value']:.4f} {g['metric']} against the "
                         f"labels (floor {g['min']:.4f}).")
        else:
            lines.append(f"- quality gate: step {g['failed_step']} lost {g['drop']:.4f} {g['metric']} "
                         f"(allowed {g['max_drop']:.4f}).")
    path = Path(out_dir) / "model_card.md"
    path.write_text("\n".join(lines) + "\n")
    return ArtifactFile("model_card", "markdown", path, None, MARKDOWN)
