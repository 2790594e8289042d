"""Memories a block can host. Adding one: its own file, one line in KINDS (and its name in
config.MEMORY_KINDS, which the flags check against); the model does not change."""

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import PAD, Memory, Segment, State
from imm_cli.memory.delta import DeltaMemory
from imm_cli.memory.episodic import EpisodicMemory
from imm_cli.memory.knn import KNNMemory
from imm_cli.memory.linformer import LinformerMemory

KINDS: dict[str, type[Memory]] = {
    "episodic": EpisodicMemory,
    "linformer": LinformerMemory,
    "knn": KNNMemory,
    "delta": DeltaMemory,
}


def build_memory(cfg: MemoryConfig, n_embd: int, bias: bool = False, block_size: int = 128) -> Memory:
    return KINDS[cfg.kind](cfg, n_embd, block_size=block_size, bias=bias)


__all__ = ["PAD", "KINDS", "Memory", "Segment", "State", "EpisodicMemory", "LinformerMemory", "build_memory"]
