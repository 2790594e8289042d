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


def check_knn_lm(weight: float | None, flag: str = "--knn-lm") -> None:
    """An experiment's kNN-LM weight override (None: the run's own), by training's range rule."""
    if weight is not None:
        config.check_knn_lm(weight, flag)


def knn_lm_of(model: GPT) -> float | None:
    """The kNN-LM weight an experiment measured with (None: a memory that proposes no next bytes)."""
    return model.cfg.memory.knn_lm if model.memory is not None and model.cfg.memory.kind == "episodic" else None


def mix_of(model: GPT) -> dict:
    """What an experiment's JSON records of the inference settings it measured with: the kNN-LM mix
    and the budget in entries (None where the memory has none)."""
    weight = knn_lm_of(model)
    return {"knn_lm": weight, "knn_exact": None if weight is None else model.cfg.memory.knn_exact,
            "memory_size": getattr(model.memory, "size", None),
            "far_weight": None if weight is None else model.cfg.memory.far_weight}


def set_knn_lm(model: GPT, weight: float | None, exact: float | None = None) -> None:
    """Let an experiment mix the episodic memory's sharp read into the output with other fixed
    weights than the run's (`weight` 0: the model's own distribution alone; `exact`: the weight of
    exactly matching contexts; None keeps the run's): inference only, weights unchanged."""
    check_knn_lm(weight)
    check_knn_lm(exact, "--knn-exact")
    _episodic_only(model, f"{'--knn-lm' if weight is not None else '--knn-exact'}: only the episodic memory proposes next bytes")
    mem = model.cfg.memory
    _set_memory(model, knn_lm=mem.knn_lm if weight is None else weight, knn_exact=mem.knn_exact if exact is None else exact)


def check_far_weight(weight: float | None) -> None:
    """An experiment's far-key weight override (None: the run's own), by training's range rule."""
    if weight is not None:
        config.check_far_weight(weight, "--far-weight")


def set_far_weight(model: GPT, weight: float) -> None:
    """Read with the episodic memory's far key at this weight (0: off): inference only, weights unchanged."""
    check_far_weight(weight)
    _episodic_only(model, "--far-weight: only the episodic memory has a far key")
    _set_memory(model, far_weight=weight)


def _episodic_only(model: GPT, what: str) -> None:
    """An InputError `what` (naming this run's memory) unless the run's memory is episodic."""
    if knn_lm_of(model) is None:
        raise InputError(f"{what} (this run's memory: {model.cfg.memory.kind if model.memory is not None else 'none'})")


def _set_memory(model: GPT, **fields) -> config.MemoryConfig:
    """The model and its memory reading with these MemoryConfig fields changed (inference settings)."""
    mem = replace(model.cfg.memory, **fields)
    model.cfg = replace(model.cfg, memory=mem)
    model.memory.cfg = mem
    return mem


def check_memory_size(size: int | None, memory: config.MemoryConfig) -> None:
    """An experiment's budget override (None: the run's own) for a run whose memory is `memory`:
    only the memories with a budget in entries, by training's range rule (--slots to 1,048,576)."""
    if size is None:
        return
    kind = memory.kind if memory.enabled else "none"
    if kind not in config.BUDGETED:
        raise InputError(f"--memory-size: only the {' and '.join(config.BUDGETED)} memories have a budget in entries "
                         f"(this run's memory: {kind})")
    replace(memory, size=size).check()  # training's rule: at least --slots entries


def set_memory_size(model: GPT, size: int) -> None:
    """Let an experiment give the memory another budget in entries than the run's. Retention acts
    at inference only (training episodes never fill the budget), so the same weights measure what
    any budget keeps: the episodic memory's retention, the knn memory's FIFO."""
    check_memory_size(size, model.cfg.memory)
    _set_memory(model, size=size)
    model.memory.size = size


def set_inference(model: GPT, knn_lm: float | None = None, knn_exact: float | None = None, memory_size: int | None = None,
                  far_weight: float | None = None) -> None:
    """An experiment's inference-time overrides of the run's settings (None keeps the run's)."""
    if knn_lm is not None or knn_exact is not None:
        set_knn_lm(model, knn_lm, knn_exact)
    if far_weight is not None:
        set_far_weight(model, far_weight)
    if memory_size is not None:
        set_memory_size(model, memory_size)


MAX_FACT_BYTES = 200  # longer than a window is fine: scoring slides, generation re-primes the window


def open_facts(path: Path, model: GPT) -> list[Fact]:
    """Facts of at most MAX_FACT_BYTES bytes (a fact need not fit the model's window)."""
    return load_facts(path, max_bytes=MAX_FACT_BYTES)
