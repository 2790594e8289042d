"""optimal_config_results.png of a sweep: its figures across the grid, the best point marked.

Four panels, one bar group per point (labelled by the grid values that vary): validation loss
(memory carried vs ablated), needle recall@1 (memory vs fresh memory: the control), pattern
similarity (vs the memory's initial state) and slot-usage entropy (1 = perfectly even). The point
ranked best is drawn in a strong colour with a star; points without a figure show no bar.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imm_cli.experiments.sweep import FIGURES, label, varying  # noqa: E402
from imm_cli.plots.training import save_figure  # noqa: E402

YLABEL = {"val_loss": "nats per byte", "needle_recall_at_1": "share of facts", "store_similarity": "cosine similarity",
          "usage_entropy": "normalised entropy (0..1)"}
PANELS = [
    ("validation loss (lower is better)", "val_loss", "val_loss_ablated", "memory carried", "memory ablated"),
    ("needle recall@1", "needle_recall_at_1", "needle_recall_at_1_fresh", "memory (fact written once)", "fresh memory (control)"),
    ("pattern similarity", "store_similarity", "store_similarity_initial", "memory after writing", "initial state (control)"),
    ("slot-usage entropy (1 = even)", "usage_entropy", None, "memory", None),
]


def _v(rec: dict, key: str | None) -> float:
    if key is None:
        return np.nan
    v = rec["figures"].get(key)
    return np.nan if v is None else float(v)


def plot_sweep(records: list[dict], rank_by: str, path: Path) -> None:
    """`records` best first (as run_sweep returns them); the grid order is kept on the x axis."""
    if not records:
        return
    best = records[0]["name"]
    order = sorted(records, key=lambda r: r["name"])
    dims = varying(order)
    labels = [label(r, dims) for r in order]
    x = np.arange(len(order))
    fig, axes = plt.subplots(2, 2, figsize=(max(9, 1.2 * len(order) + 5), 7.5))
    for ax, (title, main, ctrl, main_label, ctrl_label) in zip(axes.flat, PANELS):
        w = 0.4 if ctrl else 0.6
        vals = np.array([_v(r, main) for r in order])
        colors = ["tab:orange" if r["name"] == best else "tab:blue" for r in order]
        ax.bar(x - (w / 2 if ctrl else 0), vals, w, color=colors, label=main_label)
        if ctrl:
            cv = np.array([_v(r, ctrl) for r in order])
            ax.bar(x + w / 2, cv, w, color="tab:gray", alpha=0.6, label=ctrl_label)
        for i, r in enumerate(order):
            if np.isnan(vals[i]):
                ax.text(x[i], 0, "n/a", ha="center", va="bottom", fontsize=8, color="tab:red")
            elif r["name"] == best:
                ax.plot(x[i] - (w / 2 if ctrl else 0), vals[i], marker="*", markersize=14, color="black")
        ax.set_ylabel(YLABEL.get(main, ""))
        ax.set_xlabel("grid point")
        ax.set_title(title + (f"  [ranked by {FIGURES[rank_by][0]}]" if main == rank_by else ""), fontsize=10)
        ax.set_xticks(x, labels, rotation=30 if len(order) > 4 else 0, ha="right" if len(order) > 4 else "center", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
        if main == "val_loss":  # losses sit close together: show their differences, not the distance from 0
            both = np.concatenate([vals, np.array([_v(r, ctrl) for r in order])])
            both = both[np.isfinite(both)]
            if both.size:
                lo, hi = both.min(), both.max()
                ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3) - 0.02, hi + 0.1 * (hi - lo + 1e-3) + 0.02)
    fig.suptitle(f"sweep over {', '.join(dims) or 'one point'}: best ({FIGURES[rank_by][0]}, then validation loss) = "
                 f"{label(records[0], dims)} (orange, star)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
