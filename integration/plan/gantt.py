"""Gantt chart of a simulated iteration: one row per node, bars per op, coloured by microbatch.

Forward bars are solid, backward bars hatched, head+loss bars black; white space is idle time.
matplotlib is imported lazily (Agg backend) so the planning package stays import-light.
"""

from __future__ import annotations

from pathlib import Path

from .routeplan import RoutePlan
from .simulator import SimResult


def gantt_chart(result: SimResult, plan: RoutePlan, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG or SVG (by suffix) Gantt chart of ``result`` and return its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    where = plan.node_stage()
    nodes = sorted(where, key=lambda n: (where[n][0], where[n][1]))
    row = {n: i for i, n in enumerate(nodes)}
    cmap = plt.get_cmap("tab20")
    n_mb = max(1, plan.num_microbatches)
    fig_h = max(3.0, 0.32 * len(nodes) + 1.5)
    fig, ax = plt.subplots(figsize=(14, fig_h))
    for op in result.ops:
        y = row[op.node]
        if op.phase == "L":
            ax.barh(y, op.end - op.start, left=op.start, height=0.8, color="black")
            continue
        color = cmap((op.mb % 20) / 20 if n_mb > 1 else 0)
        ax.barh(y, op.end - op.start, left=op.start, height=0.8, color=color, edgecolor="black", linewidth=0.3,
                hatch="///" if op.phase == "B" else None, alpha=0.75 if op.phase == "B" else 1.0)
        if op.end - op.start > 0.35 * result.iteration_s / 60:
            ax.text((op.start + op.end) / 2, y, str(op.mb), ha="center", va="center", fontsize=5)
    ax.set_yticks(range(len(nodes)))
    ax.set_yticklabels([f"s{where[n][0]} r{where[n][1]} (node {n})" for n in nodes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.axvline(result.compute_end_s, color="red", linewidth=0.8, linestyle="--")
    ax.set_title(title or f"{plan.meta.get('builder', 'plan')}: {result.mode} mode, {result.iteration_s:.2f} s")
    ax.legend(handles=[Patch(facecolor="grey", label="forward (colour = microbatch)"),
                       Patch(facecolor="grey", hatch="///", alpha=0.75, label="backward"),
                       Patch(facecolor="black", label="head + loss")], loc="lower right", fontsize=7)
    ax.grid(axis="x", linewidth=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
