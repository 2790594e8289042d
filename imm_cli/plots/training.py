"""loss.png: training loss per step and validation loss (memory carried and ablated)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from imm_cli.runs import atomic_write_bytes


def save_figure(fig, path: Path) -> None:
    """Render to memory, then write atomically: a plot is never half-written."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def plot_loss(rows: list[dict], path: Path) -> None:
    steps = [r["step"] for r in rows if "loss" in r and isinstance(r.get("loss"), float)]
    loss = [r["loss"] for r in rows if "loss" in r and isinstance(r.get("loss"), float)]
    ev = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.8, alpha=0.6, label="train (episode mean)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="validation, memory carried")
        abl = [r for r in ev if r.get("val_loss_ablated") is not None]
        if abl:  # the control, drawn even where it equals the carried loss (no memory, or a read that adds nothing)
            same = all(r["val_loss_ablated"] == r["val_loss"] for r in abl)
            ax.plot([r["step"] for r in abl], [r["val_loss_ablated"] for r in abl], "s--",
                    label="validation, memory read ablated (control)" + (": identical" if same else ""))
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("imm train: loss per byte on training episodes and on held-out validation text")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
