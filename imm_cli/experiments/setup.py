"""Open a run for an experiment: the checked model and the held-out text of its corpus."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from imm_cli import config, runs
from imm_cli.data import load_corpus
from imm_cli.errors import InputError
from imm_cli.facts import Fact, load_facts
from imm_cli.model import GPT


def open_run(run: Path, device: str = "cpu") -> tuple[GPT, dict, np.ndarray]:
    """(model in eval mode, config dict, validation bytes of the corpus the run was trained on)."""
    from imm_cli.train import resolve_device

    dev = resolve_device(device)
    model, cfg = runs.load_run(run, dev)
    corpus = load_corpus(cfg.get("train", {}).get("data"))
    return model, cfg, corpus.val


def check_knn_lm(weight: float | None) -> None:
    """An experiment's kNN-LM weight override (None: the run's own), by training's range rule."""
    if weight is not None:
        config.check_knn_lm(weight, "--knn-lm")


def knn_lm_of(model: GPT) -> float | None:
    """The kNN-LM weight an experiment measured with (None: a memory that proposes no next bytes)."""
    return model.cfg.memory.knn_lm if model.memory is not None and model.cfg.memory.kind == "episodic" else None


def set_knn_lm(model: GPT, weight: float) -> None:
    """Let an experiment mix the episodic memory's sharp read into the output with another fixed
    weight than the run's (0: the model's own distribution alone): inference only, weights unchanged."""
    check_knn_lm(weight)
    if knn_lm_of(model) is None:
        raise InputError("--knn-lm: only the episodic memory proposes next bytes (this run's memory: "
                         f"{model.cfg.memory.kind if model.memory is not None else 'none'})")
    mem = replace(model.cfg.memory, knn_lm=weight)
    model.cfg = replace(model.cfg, memory=mem)
    model.memory.cfg = mem


MAX_FACT_BYTES = 200  # longer than a window is fine: scoring slides, generation re-primes the window


def open_facts(path: Path, model: GPT) -> list[Fact]:
    """Facts of at most MAX_FACT_BYTES bytes (a fact need not fit the model's window)."""
    return load_facts(path, max_bytes=MAX_FACT_BYTES)
