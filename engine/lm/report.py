"""The report of a causal LM job: rows per model, CPU generation speed, generation samples, the model card.

A row (teacher, each step, the baseline) holds ``num_parameters``, ``size_bytes`` (the weights as held in memory,
float32 unless quantized), ``latency_ms`` = ``{"batch_1", "batch_32"}``: milliseconds per generated token with
greedy decoding and the KV cache at batch 1 and 32 (one decode step for 32 sequences), ``generation`` =
``{"ms_per_token", "tokens_per_second"}`` at batch 1, and the held-out ``perplexity``, ``nll``, top-1 token
``agreement`` and mean per-token ``kl`` (KL(teacher ‖ model)).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.lm.text_data import TokenBlocks
from engine.values import ArtifactFile

#: Tokens generated per timing run, and runs per measurement (the median is kept).
SPEED_TOKENS = 16
SPEED_RUNS = 3
SAMPLE_PROMPT_TOKENS = 24
SAMPLE_NEW_TOKENS = 32
LM_METRICS = ("perplexity", "nll", "agreement", "kl")


def model_bytes(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, pad_id: int | None) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, use_cache=True)


def generation_speed(model: Any, prompt: torch.Tensor, pad_id: int | None) -> dict[str, Any]:
    """CPU decode speed of ``model`` (copied to the CPU when elsewhere): ms per new token at batch 1 and 32."""
    cpu = model if next(model.parameters()).device.type == "cpu" else _cpu_copy(model)
    cpu.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for batch in (1, 32):
            ids = prompt[:1].repeat(batch, 1).cpu()
            _generate(cpu, ids, 2, pad_id)  # warm-up
            runs = []
            for _ in range(SPEED_RUNS):
                started = time.perf_counter()
                _generate(cpu, ids, SPEED_TOKENS, pad_id)
                runs.append((time.perf_counter() - started) * 1000 / SPEED_TOKENS)
            out[f"batch_{batch}"] = statistics.median(runs)
    return {"latency_ms": out, "generation": {"ms_per_token": out["batch_1"],
                                              "tokens_per_second": 1000.0 / out["batch_1"] if out["batch_1"] else None}}


def _cpu_copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model).to("cpu").float()


def model_row(model: Any, scores: Mapping[str, float], prompt: torch.Tensor, pad_id: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"num_parameters": int(sum(p.numel() for p in model.parameters())),
                           "size_bytes": model_bytes(model), **generation_speed(model, prompt, pad_id)}
    row.update({k: float(scores[k]) for k in LM_METRICS if k in scores})
    return row


def greedy(model: Any, tok: Any, ids: torch.Tensor, new_tokens: int = SAMPLE_NEW_TOKENS) -> str:
    """The greedy continuation of ``ids`` [1, P] by a local model, as text."""
    with torch.no_grad():
        gen = _generate(model.eval(), ids, new_tokens, tok.pad_token_id)
    return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def samples(teacher: Any, student: Any, tok: Any, val: TokenBlocks, device: torch.device, n: int = 3
            ) -> list[dict[str, str]]:
    """Greedy continuations of the first tokens of ``n`` held-out sequences, teacher and student side by side;
    ``teacher`` is a :mod:`engine.lm.teachers` side (``.greedy(tok, ids)``)."""
    out = []
    for i in range(min(n, val.n)):
        length = int(val.attention_mask[i].sum())
        ids = val.input_ids[i: i + 1, : min(SAMPLE_PROMPT_TOKENS, max(1, length // 2))].to(device)
        out.append({"prompt": tok.decode(ids[0], skip_special_tokens=True), "teacher": teacher.greedy(tok, ids),
                    "student": greedy(student, tok, ids)})
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_model_card(report: Mapping[str, Any], spec: Mapping[str, Any], out_dir: Path) -> ArtifactFile:
    """``model_card.md``: teacher, recipe, data, the results table, generation samples, limits."""
    t, rows, data = report["teacher"], report["steps"], report["data"]
    lines = ["# Model card", "", "## Teacher", "",
             f"- format: `hf_transformers`, task: causal_lm, architecture: {data.get('architecture')}",
             f"- sha256: `{report['reproducibility'].get('teacher_sha256')}`",
             f"- parameters: {t['num_parameters']:,}", "",
             "## Recipe", "", "```json",
             json.dumps({"student": spec.get("student"), "steps": spec.get("steps")}, indent=2, default=str),
             "```", "", "## Data", "",
             f"- records: {data.get('records')} ({data.get('val_source')}), training sequences: "
             f"{data.get('train_sequences')}, held-out sequences: {data.get('val_sequences')} "
             f"({data.get('val_tokens')} target tokens)", "",
             "## Results (held-out)", ""]
    head = ["model", "parameters", "size (bytes)", "ms/token b1 / b32 (CPU)", "perplexity", "agreement", "KL"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, r: Mapping[str, Any]) -> str:
        lat = r.get("latency_ms") or {}
        return "| " + " | ".join([name, _fmt(r.get("num_parameters")), _fmt(r.get("size_bytes")),
                                  f"{_fmt(lat.get('batch_1'), 3)} / {_fmt(lat.get('batch_32'), 3)}",
                                  _fmt(r.get("perplexity")), _fmt(r.get("agreement")), _fmt(r.get("kl"))]) + " |"

    lines.append(line("teacher", t))
    for r in rows:
        lines.append(line(f"step {r['index']}: {r['kind']} {r['method']}", r))
    if report.get("baseline"):
        lines.append(line("baseline (data alone)", report["baseline"]))
    lines += ["", "## Generation samples (greedy)", ""]
    for s in report.get("samples") or []:
        lines += [f"**Prompt**: {s['prompt']!r}", "", f"- teacher: {s['teacher']!r}", f"- student: {s['student']!r}",
                  ""]
    lines += ["## Limits", "",
              "- Perplexity is measured on the job's held-out text; it says how well the student predicts text like "
              "it, not whether its answers are right. Check generations on your own prompts.",
              "- The student imitates the teacher, errors and biases included; `agreement` is how often its most "
              "likely next token is the teacher's."]
    path = Path(out_dir) / "model_card.md"
    path.write_text("\n".join(lines) + "\n")
    return ArtifactFile("model_card", "markdown", path, None, "text/markdown")


def history_plot(history: Sequence[Mapping[str, Any]], out_dir: Path) -> list[ArtifactFile]:
    """``training_curves.png``: held-out perplexity and train loss per epoch, per step and for the baseline."""
    if not history:
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for kind in sorted({h["kind"] for h in history}):
        pts = [h for h in history if h["kind"] == kind]
        xs = list(range(1, len(pts) + 1))
        axes[0].plot(xs, [h["perplexity"] for h in pts], marker="o", label=kind)
        axes[1].plot(xs, [h["train_loss"] for h in pts], marker="o", label=kind)
    axes[0].set_title("held-out perplexity")
    axes[1].set_title("train loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / "training_curves.png"
    fig.savefig(path, dpi=80)
    return [ArtifactFile("plot", "png", path, None, "image/png")]
