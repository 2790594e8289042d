"""Memories a block can host, built from the registry `config.MEMORIES` (kind -> "module:Class").
Adding one: its own file here and one line in that table; the model does not change."""

import importlib

from imm_cli.config import MEMORIES, MemoryConfig
from imm_cli.memory.base import PAD, Memory, Segment, State


def _load(path: str) -> type[Memory]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


KINDS: dict[str, type[Memory]] = {kind: _load(path) for kind, path in MEMORIES.items()}
EpisodicMemory, LinformerMemory = KINDS["episodic"], KINDS["linformer"]


def build_memory(cfg: MemoryConfig, n_embd: int, bias: bool = False, block_size: int = 128) -> Memory:
    return KINDS[cfg.kind](cfg, n_embd, block_size=block_size, bias=bias)


__all__ = ["PAD", "KINDS", "Memory", "Segment", "State", "EpisodicMemory", "LinformerMemory", "build_memory"]
