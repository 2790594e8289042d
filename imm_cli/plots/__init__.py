"""Matplotlib figures from result objects. Imported only when a plot is written (Agg backend)."""

import matplotlib

matplotlib.use("Agg")

from imm_cli.plots.training import plot_loss  # noqa: E402

__all__ = ["plot_loss"]
