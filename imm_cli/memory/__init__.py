"""Memories a block can host. Add a kind here and in config.MEMORY_KINDS; the model does not change."""

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import PAD, Memory, Segment, State
from imm_cli.memory.episodic import EpisodicMemory
from imm_cli.memory.linformer import LinformerMemory

KINDS = {"episodic": EpisodicMemory, "linformer": LinformerMemory}


def build_memory(cfg: MemoryConfig, n_embd: int, bias: bool = False, block_size: int = 128) -> Memory:
    if cfg.kind == "episodic":
        return EpisodicMemory(cfg, n_embd, bias=bias, block_size=block_size)
    return KINDS[cfg.kind](cfg, n_embd, bias=bias)


__all__ = ["PAD", "KINDS", "Memory", "Segment", "State", "EpisodicMemory", "LinformerMemory", "build_memory"]
