"""Figures of the store and usage experiments, drawn from their result dicts (`to_dict()` or the
saved store.json / usage.json), so the combined figure can be drawn by whichever command runs last.

pattern_similarity.png     s_t over the sequences with a band of +-1 std over slots, the best slot,
                           and the controls as lines
slot_usage_heatmap.png     usage (sequences x slots, slot mean = 1 per row) and the per-slot mean as bars
optimal_config_results.png both side by side (the notes' combined figure)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imm_cli.experiments.metrics import DEAD, DOMINANT  # noqa: E402
from imm_cli.plots.training import save_figure  # noqa: E402

CONTROL_STYLE = {
    "initial": ("memory in its initial state", "tab:gray", "--"),
    "random": ("random unit vectors", "tab:red", ":"),
    "other_sequence": ("slots vs another sequence", "tab:purple", "-."),
}


def _f(xs) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in xs], dtype=float)


def _mem_label(r: dict) -> str:
    m = r["memory"]
    return f"{m['kind']} memory, {m['slots']} slots"


def draw_similarity(ax, store: dict) -> None:
    s = _f(store["per_sequence"])
    sd = _f(store["per_sequence_std"])
    t = np.arange(len(s))
    ax.plot(t, s, "o-", ms=3, color="tab:blue", label="mean over slots (s_t)")
    ax.fill_between(t, s - sd, s + sd, color="tab:blue", alpha=0.2, label="± std over slots")
    ax.plot(t, _f(store["best_slot"]), "-", lw=1, color="tab:green", label="best slot")
    for name, c in store["controls"].items():
        label, color, ls = CONTROL_STYLE.get(name, (name, "black", "--"))
        vals = _f(c["per_sequence"])
        if np.isfinite(vals).any():
            ax.plot(t, vals, ls, lw=1.2, color=color, label=f"control: {label}")
        else:
            ax.plot([], [], ls, color=color, label=f"control: {label} (undefined: all slots empty)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("sequence t (memory carried, updates on)")
    ax.set_ylabel("cosine(slot, mean hidden state of t)")
    mean, std = store["mean"], store["std"]
    head = f"pattern similarity {mean:.3f} ± {std:.3f}" if mean is not None else "pattern similarity (undefined)"
    sc = store.get("slot_cosine")
    if sc is not None:
        head += f"; slot-to-slot cosine {sc:.2f}"
    ax.set_title(f"{head}\n{_mem_label(store)}, {_seq_label(store)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)


def _seq_label(r: dict) -> str:
    text = "random bytes" if r.get("random_tokens") else "held-out text"
    return f"{r.get('sequences', '?')} sequences x {r.get('block_size', '?')} bytes of {text}"


def draw_heatmap(ax, usage: dict, fig) -> None:
    u = _f([v for row in usage["usage"] for v in row]).reshape(len(usage["usage"]), -1)
    # a few early rows (one filled slot takes everything) would wash out the colour scale: clip at the
    # 99th percentile, the colour bar's arrow marks the clipped values
    vmax = max(2.0, float(np.nanpercentile(u, 99)) if np.isfinite(u).any() else 2.0)
    masked = np.ma.masked_invalid(u)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
    im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=vmax)
    ax.set_xlabel("memory slot")
    ax.set_ylabel("sequence t")
    ax.set_xticks(range(u.shape[1]))
    title = f"slot usage, {_mem_label(usage)}, {_seq_label(usage)} (each row: slot mean = 1)\nentropy {_n(usage['entropy'])}, min/max {_n(usage['min_max_ratio'])}, cv {_n(usage['cv'])}"
    if usage.get("undefined_rows"):
        title += f"; gray = nothing read ({usage['undefined_rows']} rows)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="read attention mass / slot mean", extend="max" if np.nanmax(u) > vmax else "neither")


def draw_bars(ax, usage: dict) -> None:
    m = _f(usage["slot_mean"])
    lo, hi = _f(usage["slot_min"]), _f(usage["slot_max"])
    x = np.arange(len(m))
    colors = ["tab:red" if i in usage["dead_slots"] else "tab:orange" if i in usage["dominant_slots"] else "tab:blue"
              for i in x]
    ax.bar(x, m, color=colors, yerr=[np.nan_to_num(m - lo), np.nan_to_num(hi - m)], capsize=3,
           error_kw={"lw": 0.8}, label="mean usage over sequences (bars: min..max)")
    ax.axhline(1.0, color="black", lw=1, ls="--", label="perfectly even (1.0)")
    ax.axhline(DEAD, color="tab:red", lw=0.8, ls=":", label=f"dead below {DEAD}")
    if np.nanmax(hi) > DOMINANT * 0.8:
        ax.axhline(DOMINANT, color="tab:orange", lw=0.8, ls=":", label=f"dominant above {DOMINANT:g}")
    ax.set_xticks(x)
    ax.set_xlabel("memory slot")
    ax.set_ylabel("usage (slot mean = 1)")
    g = usage["gates"][0] if usage.get("gates") else None
    gate = f"; read gate {_n(g['mean'])} ± {_n(g['std'])}" if g else ""
    ax.set_title(f"per-slot usage, {_mem_label(usage)}{gate}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _n(x, digits: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def plot_pattern_similarity(store: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw_similarity(ax, store)
    save_figure(fig, path)


def plot_slot_usage(usage: dict, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.3, 1]})
    draw_heatmap(a, usage, fig)
    draw_bars(b, usage)
    fig.tight_layout()
    save_figure(fig, path)


def plot_combined(store: dict, usage: dict, path: Path) -> None:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw={"width_ratios": [1.4, 1.1, 1]})
    draw_similarity(a, store)
    draw_heatmap(b, usage, fig)
    draw_bars(c, usage)
    fig.suptitle(f"imm: pattern storage and slot usage — {store['run']}", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
