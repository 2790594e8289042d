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


def plot_capacity(result: dict, path: Path) -> None:
    cap = result["capacity"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cap["n_facts"], cap["exact_match"], "o-", label="memory: exact match")
    ax.plot(cap["n_facts"], cap["char_accuracy"], "s-", label="memory: character accuracy")
    fresh = result["conditions"]["fresh"]
    ax.axhline(fresh["exact_match"], color="C0", ls=":", label="fresh memory: exact match")
    ax.axhline(fresh["char_accuracy"], color="C1", ls=":", label="fresh memory: character accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cap["n_facts"], [str(n) for n in cap["n_facts"]])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("facts written into one memory (each in its own haystack)")
    ax.set_ylabel("share of facts (exact) or bytes (char acc)")
    ax.set_title(f"Needle capacity: recall as facts share one memory\n({result['model'].get('memory', '?')} memory, "
                 f"{result['model']['slots']} slots, haystacks of {result['settings']['length']} bytes)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
