"""compare.png: several runs side by side, every figure beside its controls in the same axes."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from imm_cli.plots.training import save_figure

CONDITION_LABEL = {"memory": "memory (fact written once)", "fresh": "fresh memory (control)",
                   "other_facts": "other facts (control)", "in_context": "fact in window (upper bound)"}
CONTROL_STYLES = ("--", ":", "-.")  # one line style per control of a curve, in the run's colour
STORE_BARS = (("mean", "slots vs the sequence seen"), ("other_sequence", "control: another sequence"),
              ("initial", "control: initial memory"), ("random", "control: random unit vectors"))


def _v(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.nan


def _bars(ax, names: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per run, one bar per series; a missing value is marked 'n/a'."""
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    for i, (label, ys) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, [0 if math.isnan(y) else y for y in ys], width, label=label)
        for p, y in zip(pos, ys):
            if math.isnan(y):
                ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _loss(ax, doc: dict, names: list[str]) -> None:
    """Carried and ablated as two markers per run, joined: the gap is what the memory's read gives."""
    t = [r["train"] for r in doc["runs"]]
    x = np.arange(len(names))
    carried, ablated = [_v(r["val_loss"]) for r in t], [_v(r["val_loss_ablated"]) for r in t]
    ax.vlines(x, carried, ablated, color="grey", lw=1)
    ax.plot(x, carried, "o", label="memory carried")
    ax.plot(x, ablated, "s", label="memory read ablated (control)")
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("validation loss, memory carried vs ablated", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _needle(ax, doc: dict, names: list[str]) -> None:
    conds = [c for c in CONDITION_LABEL if any(r["needle"] and c in r["needle"]["conditions"] for r in doc["runs"])]
    series = {CONDITION_LABEL[c]: [_v(((r["needle"] or {}).get("conditions", {}).get(c) or {}).get("exact_match")) for r in doc["runs"]]
              for c in conds or CONDITION_LABEL}
    _bars(ax, names, series, "exact match (share of facts)", "needle: exact match per condition (dots: recall@1)")
    width = 0.8 / max(len(series), 1)
    for i, c in enumerate(conds):
        r1 = [_v(((r["needle"] or {}).get("conditions", {}).get(c) or {}).get("recall_at_1")) for r in doc["runs"]]
        ax.plot(np.arange(len(names)) - 0.4 + width * (i + 0.5), r1, "k.", ms=6, label="recall@1" if i == 0 else None)
    ax.set_ylim(0, 1.05)


def _placements(ax, doc: dict, names: list[str]) -> None:
    places = sorted({p for r in doc["runs"] if r["needle"] for p in r["needle"]["placements"]})
    series, controls = {}, {}
    for p in places:
        conds = [(r["needle"] or {}).get("placements", {}).get(p) or {} for r in doc["runs"]]
        series[f"{p}: memory"] = [_v((c.get("memory") or {}).get("exact_match")) for c in conds]
        controls[p] = [max([_v(v.get("exact_match")) for k, v in c.items() if k not in ("memory", "in_context")] or [math.nan])
                       for c in conds]
    _bars(ax, names, series, "exact match (share of facts)", "needle by placement (x: best control without the fact)")
    width = 0.8 / max(len(series), 1)
    for i, p in enumerate(places):
        ax.plot(np.arange(len(names)) - 0.4 + width * (i + 0.5), controls[p], "kx", ms=6, label="best control" if i == 0 else None)
    ax.set_ylim(0, 1.05)


def _curves(ax, doc: dict, key: str) -> None:
    """One curve per run for the memory condition, its controls dashed in the run's colour."""
    xlabel = key
    for i, r in enumerate(doc["runs"]):
        c = ((r["needle"] or {}).get("curves") or {}).get(key)
        if not c:
            continue
        colour = f"C{i % 10}"
        xlabel = c["x_name"]
        controls = [k for k in c["exact_match"] if k != "memory"]
        for cond, ys in c["exact_match"].items():
            control = cond != "memory"
            ls = CONTROL_STYLES[controls.index(cond) % len(CONTROL_STYLES)] if control else "-"
            ax.plot(c["x"], [_v(y) for y in ys], ls=ls, marker="" if control else "o", color=colour,
                    alpha=0.6 if control else 1.0, label=f"{r['name']}" + (f" ({cond})" if control else ""))
    xs = [x for r in doc["runs"] for x in (((r["needle"] or {}).get("curves") or {}).get(key) or {}).get("x", [])]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    axis = {"capacity": "facts written into one memory", "document": "facts spread through one document (one memory)",
            "distance": "bytes written after the fact (haystack length)"}.get(key)
    ax.set_xlabel(axis or {"distance": "bytes between fact and cue", "n_facts": "facts written into one memory"}.get(xlabel, xlabel))
    ax.set_ylabel("exact match (share of facts)")
    ax.set_ylim(0, 1.05)
    ax.set_title("capacity: facts in one memory (dashed/dotted: controls)" if key == "capacity" else f"needle {key} (dashed/dotted: controls)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _store(ax, doc: dict, names: list[str]) -> None:
    def val(s, key):
        if s is None:
            return math.nan
        return _v(s["mean"]) if key == "mean" else _v(s["controls"][key]["mean"])

    _bars(ax, names, {label: [val(r["store"], key) for r in doc["runs"]] for key, label in STORE_BARS},
          "cosine similarity", "pattern similarity s_t with its controls")
    ax.axhline(0, color="grey", lw=0.8)


def _usage(ax, doc: dict, names: list[str]) -> None:
    u = [r["usage"] or {} for r in doc["runs"]]
    _bars(ax, names, {"normalised entropy (1 = even)": [_v(x.get("entropy")) for x in u],
                      "min/max ratio (1 = even)": [_v(x.get("min_max_ratio")) for x in u],
                      "share of dead slots": [_v(x["dead_slots"] / x["slots"]) if x.get("slots") else math.nan for x in u]},
          "evenness (no unit)", "slot usage evenness")
    ax.set_ylim(0, 1.05)


def _speed(ax, doc: dict, names: list[str]) -> None:
    _bars(ax, names, {"tokens/s relative to --slots 0": [_v((r["speed"] or {}).get("ratio")) for r in doc["runs"]]},
          "throughput ratio (1 = as fast)", "training throughput vs --slots 0 (paired steps)")
    ax.axhline(1.0, color="grey", ls="--", lw=0.8, label="--slots 0")


def plot_compare(doc: dict, path: Path) -> None:
    names = [r["name"] for r in doc["runs"]]
    panels = [lambda ax: _loss(ax, doc, names), lambda ax: _needle(ax, doc, names)]
    if any(r["needle"] and r["needle"]["placements"] for r in doc["runs"]):
        panels.append(lambda ax: _placements(ax, doc, names))
    curve_keys = sorted({k for r in doc["runs"] if r["needle"] for k in r["needle"]["curves"]} | {"capacity"},
                        key=lambda k: (k != "capacity", k))
    panels += [lambda ax, k=k: _curves(ax, doc, k) for k in curve_keys]
    panels += [lambda ax: _store(ax, doc, names), lambda ax: _usage(ax, doc, names), lambda ax: _speed(ax, doc, names)]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False, layout="constrained")
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    facts = sorted({str(r["needle"]["facts_file"]) for r in doc["runs"] if r["needle"]})
    fig.suptitle(f"imm compare: {', '.join(names)}\nmeasured per run: validation loss (training summary), needle on "
                 f"{', '.join(facts) or '(not run)'}, store/usage on held-out text, speed in paired training steps")
    save_figure(fig, path)
