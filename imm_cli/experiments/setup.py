"""Open a run for an experiment: the checked model and the held-out text of its corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imm_cli import runs
from imm_cli.data import load_corpus
from imm_cli.facts import Fact, load_facts
from imm_cli.model import GPT


def open_run(run: Path, device: str = "cpu") -> tuple[GPT, dict, np.ndarray]:
    """(model in eval mode, config dict, validation bytes of the corpus the run was trained on)."""
    from imm_cli.train import resolve_device

    dev = resolve_device(device)
    model, cfg = runs.load_run(run, dev)
    corpus = load_corpus(cfg.get("train", {}).get("data"))
    return model, cfg, corpus.val


MAX_FACT_BYTES = 200  # longer than a window is fine: scoring slides, generation re-primes the window


def open_facts(path: Path, model: GPT) -> list[Fact]:
    """Facts of at most MAX_FACT_BYTES bytes (a fact need not fit the model's window)."""
    return load_facts(path, max_bytes=MAX_FACT_BYTES)
