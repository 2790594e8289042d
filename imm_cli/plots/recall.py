"""Figures of the recall experiments: context influence, needle heatmap, capacity curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from imm_cli.plots.training import save_figure


def plot_context_influence(result: dict, path: Path) -> None:
    ci = result["context_influence"]
    prompt, rest = ci["prompt_positions"], ci["rest_positions"]
    xs_p = np.arange(len(prompt))
    xs_r = np.arange(len(prompt) - 1, len(prompt) - 1 + len(rest))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs_p, prompt, label="prompt (other text, then cue)")
    ax.plot(xs_r, rest, label="rest of the fact (teacher-forced)")
    ax.axvline(ci["cue_start"], color="grey", ls=":", label="cue starts (longest cue)")
    ax.set_xlabel("position in prompt + rest (bytes)")
    ax.set_ylabel("KL(read on || read off), nats")
    m = result.get("model") or {}
    ax.set_title(f"Memory influence on next-byte predictions, {m.get('memory', '?')} memory, {m.get('slots', '?')} slots\n"
                 f"(KL with the read on vs off, mean over {result['settings']['facts']} facts)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_needle_heatmap(result: dict, path: Path) -> None:
    hm = result["heatmap"]
    em = np.array(hm["exact_match"])
    ca = np.array(hm["char_accuracy"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, data, title in ((axes[0], em, "exact match"), (axes[1], ca, "character accuracy")):
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(hm["depths"])), [f"{d:g}" for d in hm["depths"]])
        ax.set_yticks(range(len(hm["lengths"])), [str(x) for x in hm["lengths"]])
        ax.set_xlabel("depth of the fact in its haystack (0 = start)")
        ax.set_ylabel("haystack length (bytes)")
        ax.set_title(f"memory condition: {title}")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="w" if data[i, j] < 0.6 else "k", fontsize=8)
        fig.colorbar(im, ax=ax, label="share of facts (0..1)" if title == "exact match" else "share of bytes (0..1)")
    m, s = result.get("model") or {}, result.get("settings") or {}
    fresh = (result.get("conditions") or {}).get("fresh") or {}
    control = (f"; control, fresh memory: exact {fresh['exact_match']:.2f}, char acc {fresh['char_accuracy']:.2f}"
               if "exact_match" in fresh and "char_accuracy" in fresh else "")
    fig.suptitle(f"Needle recall over haystack length x depth: {s.get('facts', '?')} facts, {m.get('memory', '?')} memory, "
                 f"{m.get('slots', '?')} slots{control}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _curves(ax, xs: list, curve: dict, conds: dict[str, str]) -> None:
    """Exact match (solid) and character accuracy (dashed) of each condition, controls in the same axes."""
    for i, (cond, label) in enumerate(conds.items()):
        c = curve[cond]
        ax.plot(xs, c["exact_match"], "o-", color=f"C{i}", label=f"{label}: exact match")
        ax.plot(xs, c["char_accuracy"], "s--", color=f"C{i}", alpha=0.6, label=f"{label}: character accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of facts (exact) or of rest bytes (char. acc.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _model_line(result: dict) -> str:
    m = result["model"]
    size = f", {m['memory_size']:,} entries" if m.get("memory_size") and m.get("memory") == "episodic" else ""
    return f"{m.get('memory', '?')} memory, {m['slots']} slots{size}"


# each needle curve: its x key, its conditions (the memory and its controls) and its axis and title
CURVES = {
    "capacity": ("n_facts", {"memory": "memory (the document)", "fresh": "fresh memory",
                             "text_only": "memory of the text without its facts"},
                 "facts in one document ({spacing} bytes of text per fact, {placement} placement)",
                 "Capacity: recall of each of N facts written into one memory"),
    "distance": ("lengths", {"memory": "memory (fact written first)", "fresh": "fresh memory",
                             "other_facts": "another fact's memory"},
                 "haystack length in bytes, the fact at its start ({placement} placement)",
                 "Distance: recall of a fact read long before its cue"),
}


def plot_curve(result: dict, name: str, path: Path) -> None:
    """One needle curve (CURVES) with its controls in the same axes."""
    x, conds, xlabel, what = CURVES[name]
    curve = result[name]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _curves(ax, curve[x], curve, conds)
    ax.set_xlabel(xlabel.format(**curve) if "spacing" in curve or "{spacing}" not in xlabel else xlabel)
    ax.set_title(f"{what}\n({_model_line(result)}; {result['settings']['facts']} facts given)", fontsize=10)
    save_figure(fig, path)


def plot_capacity(result: dict, path: Path) -> None:
    plot_curve(result, "capacity", path)


def plot_distance(result: dict, path: Path) -> None:
    plot_curve(result, "distance", path)
