"""The Pareto plot of a student search: size (or latency) against the held-out metric, every trial.

Drawn on the trusted side from numbers only (the trials table of :func:`worker.search.trials_table`), with
matplotlib's Agg canvas (``Figure`` + ``FigureCanvasAgg``; pyplot, its global state and a display are never
touched). Finished trials are dots, the Pareto front (no other trial both smaller/faster and better) is a line,
the winner a star; pruned trials are crosses at their estimated size and the best metric they reached; the
teacher's metric and the ``max_drop`` floor are horizontal lines, a size or latency budget a vertical one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jobspec.search import SearchConfig


def pareto_front(points: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The points ``(cost, metric, number)`` no other point beats on both (lower cost, higher metric), by cost."""
    front: list[tuple[float, float, int]] = []
    for cost, metric, number in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or metric > front[-1][1]:
            front.append((cost, metric, number))
    return front


def pareto_plot(search: SearchConfig, rows: Sequence[Mapping[str, Any]], path: Path, *, winner: int | None,
                highlight: int | None = None) -> Path:
    """Write the plot of ``rows`` (the trials table) to ``path`` (PNG); returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_latency = search.objective == "fastest"
    cost_key, cost_label = (("latency_ms", "CPU latency, batch 1 (ms)") if by_latency
                            else ("num_parameters", "parameters"))
    fig = Figure(figsize=(7.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    done = [(float(r[cost_key]), float(r["metric"]), int(r["number"])) for r in rows
            if r.get("metric") is not None and r.get(cost_key) is not None]
    meets = {int(r["number"]) for r in rows if r.get("meets_target")}
    if done:
        ax.scatter([c for c, _, n in done if n in meets], [m for _, m, n in done if n in meets], s=28,
                   color="tab:blue", label="trial (meets the target)", zorder=3)
        ax.scatter([c for c, _, n in done if n not in meets], [m for _, m, n in done if n not in meets], s=28,
                   color="tab:orange", label="trial (misses the target)", zorder=3)
        front = pareto_front(done)
        ax.plot([c for c, _, _ in front], [m for _, m, _ in front], color="tab:green", lw=1.5, zorder=2,
                marker="o", markersize=11, markerfacecolor="none", label="Pareto front")
        for cost, metric, number in done:
            ax.annotate(str(number), (cost, metric), textcoords="offset points", xytext=(4, 3), fontsize=7)
    pruned = [(float(r["estimated_parameters"]), float(r["pruned"]["value"])) for r in rows
              if r.get("pruned") and r.get("estimated_parameters") and not by_latency]
    if pruned:
        ax.scatter([c for c, _ in pruned], [m for _, m in pruned], marker="x", color="grey", s=24,
                   label="pruned (best metric reached)", zorder=2)
    teacher = next((r.get("metric") + r.get("drop") for r in rows if r.get("metric") is not None
                    and r.get("drop") is not None), None)
    if teacher is not None:
        ax.axhline(teacher, color="black", lw=1, ls="-", label=f"teacher {search.metric} {teacher:.4f}")
        if (limit := search.drop_limit()) is not None:
            ax.axhline(teacher - limit, color="tab:red", lw=1, ls="--", label=f"max_drop {limit:g}")
    budget = search.max_latency_ms if by_latency else search.max_parameters
    if budget is not None:
        ax.axvline(budget, color="tab:purple", lw=1, ls=":", label="budget")
    for number, style in ((winner, {"color": "gold", "label": "winner"}),
                          (highlight, {"color": "tab:red", "label": "best trial (misses the target)"})):
        point = next(((c, m) for c, m, n in done if n == number), None) if number is not None else None
        if point is not None:
            ax.scatter([point[0]], [point[1]], marker="*", s=260, edgecolor="black", zorder=4, **style)
    if not by_latency:
        ax.set_xscale("log")
    ax.set_xlabel(cost_label)
    ax.set_ylabel(f"held-out {search.metric}")
    ax.set_title(f"student search: {search.objective} ({len(rows)} trials)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
