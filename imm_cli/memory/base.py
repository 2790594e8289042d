"""The small interface every memory implements, so the GPT never needs to know which one it hosts.

A memory lives in one block. Its *parameters* are learned; its *state* (a dict of tensors, one entry
per sequence of the batch) is created by `init_state`, changed by `write` after each segment, and
carried by the caller from segment to segment. Three switches serve the experiments:

- frozen:  `write` returns the state unchanged (updates off, e.g. while testing recall);
- ablated: the block skips `read` entirely, so logits equal the read-free path exactly;
- observe: `read`/`write` append what they attended to (and the gate) to `observed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

State = dict[str, Tensor]

PAD = 256  # byte id used for "no byte here" (before the start of a stream, unknown target)


@dataclass
class Segment:
    """What a memory may look at besides the hidden states of one segment."""

    ids: Tensor  # (b n) the segment's bytes
    prev: Tensor  # (b p) bytes just before the segment in the same stream (p may be 0)
    targets: Tensor  # (b n) the next byte after each position, -1 where unknown
    window: Tensor | None = None  # (b w) incremental generation: the whole window so far, ending with ids
    window_prev: Tensor | None = None  # (b p) bytes before the window
    episode: int = 0  # whole-episode forward: ids/targets are (b*episode n), the episode's segments in order
    cache: Any = None  # incremental generation: the memory layer's KVCache (memory_keys: the window's keys so far)


class Memory(nn.Module):
    """Base class: read, write, reset (init_state), freeze, ablate, observe."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False
        self.ablated = False
        self.observe = False
        self.observed: list[dict[str, Tensor]] = []

    # --- the interface -------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        """A fresh (reset) state for `batch` sequences."""
        raise NotImplementedError

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        """(b n d) normalised hidden states -> (b n d) gated update for the residual stream."""
        raise NotImplementedError

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        raise NotImplementedError

    def episode_at_once(self, segments: int, n: int) -> bool:
        """Whether a fresh episode of `segments` segments of n bytes can run as one batched forward.

        True only where every read can be computed without the forward passes of earlier segments
        (so `read_episode` gives the sequential path's result exactly); False sends training back to
        the segment-by-segment loop.
        """
        return False

    def read_episode(self, h: Tensor, seg: Segment) -> Tensor:
        """`read` for every segment of fresh episodes at once (seg.episode segments per episode)."""
        raise NotImplementedError

    def slot_vectors(self, state: State) -> Tensor:
        """(b s d): one vector per slot, what the pattern-storage test compares with hidden states."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------------
    def post_init(self) -> None:
        """Called after the GPT's generic initialisation: the read gate starts open."""
        gate = getattr(self, "gate", None)
        if isinstance(gate, nn.Linear):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, self.cfg.gate_bias)

    def write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        """Merge the segment into the state; `surprise` (b n) is the per-position loss, detached."""
        if self.frozen:
            return state
        return self._write(h, seg, state, surprise)

    def _record(self, **tensors: Tensor) -> None:
        if self.observe:
            self.observed.append({k: v.detach().float().cpu() for k, v in tensors.items()})
