"""The small interface every memory implements, so the GPT never needs to know which one it hosts.

A memory lives in one block. Its *parameters* are learned; its *state* (a dict of tensors, one row
per sequence of the batch) is created by `init_state`, changed by `write` after each segment, and
carried by the caller from segment to segment.

A new memory implements four methods and is registered with one line in `memory/__init__.py`:

    init_state(batch, device) -> State           a fresh (reset) state
    read(h, seg, state)       -> (b n d)         the gated update for the residual stream
    _write(h, seg, state, surprise) -> State     a new state holding the segment (never in place)
    slot_vectors(state)       -> (b s d)         one vector per slot, for the pattern-storage test

Everything else has a correct default that a memory may override for speed or analysis:

    read_step(h, seg, state, cache)   decoding one or a few bytes at a time (default: `read`)
    new_cache(batch)                  what `read_step` keeps between calls (default: nothing)
    episode_reader(segments, n)       whether `read_episode` can read a fresh episode in one call
    read_episode(h, stream, starts, n) exactly what the sequential loop would read (no default:
                                      without it the model runs the loop, which is always exact)
    write_over(h, seg, state, surprise)  `write` for a caller that never uses `state` again: may
                                      update its tensors in place (default: `write`)
    slot_filled(state)                which slots hold something (default: all)
    describe(state)                   figures about what the state holds, for reports (default: none)
    copies, copied                    a memory that also proposes next bytes directly: after each read,
                                      `copied` holds their mass for the model's output (default: off)
    exact_context, holds(state, ids, byte)  for memories of exact entries: how many bytes of context
                                      key an entry, and whether a state holds a given one (the
                                      miss analysis; default: None, not such a memory)
    no_weight_decay()                 parameter names AdamW must not decay (default: none)

Three switches serve the experiments:
- frozen:  `write` returns the state unchanged (updates off, e.g. while testing recall);
- ablated: the block skips `read` entirely, so logits equal the read-free path exactly;
- observe: `read`/`write` append what they attended to (and the gate) to `observed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from imm_cli.config import MemoryConfig

State = dict[str, Tensor]

PAD = 256  # byte id used for "no byte here" (before the start of a stream, unknown target)


@dataclass
class Segment:
    """What a memory may look at besides the hidden states: the bytes of the positions it reads or writes."""

    ids: Tensor  # (b n) the bytes at these positions
    prev: Tensor  # (b p) bytes just before them in the same stream (p may be 0)
    targets: Tensor  # (b n) the next byte after each position, -1 where unknown


class Memory(nn.Module):
    """Base class: the interface above, the three switches, and the read gate's initialisation."""

    exact_context: int | None = None  # bytes of context that key an exact entry (None: entries are not exact contexts)
    copies: bool = False  # whether a read leaves `copied` for the model to mix into its output

    def __init__(self, cfg: MemoryConfig, n_embd: int) -> None:
        super().__init__()
        self.cfg = cfg  # this memory's settings (slots, sizes, temperature, ...)
        self.n_embd = n_embd  # width of the hidden states it reads and writes
        self.frozen = False
        self.ablated = False
        self.observe = False
        self.observed: list[dict[str, Tensor]] = []
        # a copying memory's last read: (b n 256) weighted next-byte mass, total <= 1 per position,
        # that the model mixes into its output distribution (see GPT._trunk); taken, then cleared
        self.copied: Tensor | None = None
        # a training-only loss of the memory's own (e.g. a head scoring what to keep), from the last
        # whole-episode read; the model hands it to the training step, then clears it
        self.aux_loss: Tensor | None = None

    # --- required ------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        """A fresh (reset) state for `batch` sequences."""
        raise NotImplementedError

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        """(b n d) normalised hidden states of one segment -> (b n d) gated update for the residual stream."""
        raise NotImplementedError

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        raise NotImplementedError

    def slot_vectors(self, state: State) -> Tensor:
        """(b s d): one vector per slot, what the pattern-storage test compares with hidden states."""
        raise NotImplementedError

    # --- optional, with correct defaults -------------------------------------------------------
    def new_cache(self, batch: int) -> object | None:
        """What `read_step` keeps from one decoding call to the next (None: nothing)."""
        return None

    def read_step(self, h: Tensor, seg: Segment, state: State, cache: object | None) -> Tensor:
        """Decoding: the read of a few new positions that continue the cached ones (default: `read`,
        exact for every memory whose read of a position depends only on it and the state)."""
        return self.read(h, seg, state)

    def episode_reader(self, segments: int, n: int) -> bool:
        """Whether `read_episode` can read the segments of a fresh episode of `segments` segments of n
        bytes at once, exactly as the sequential loop would. False (the default) makes the model run
        that loop instead."""
        return False

    def read_episode(self, h: Tensor, stream: Segment, starts: list[int], n: int) -> Tensor:
        """`read` of several segments of fresh episodes at once. stream: the whole episodes (b L) with
        their targets; h (b*len(starts) n d): the hidden states of the n-byte segments that begin at
        `starts` (episode-major), each reading what the loop would have written before it."""
        raise NotImplementedError(f"{type(self).__name__} has no whole-episode read")

    def read_only(self, state: State) -> State:
        """The state as a frozen memory reads it, as small as it can be (default: unchanged). The
        experiments repeat a state for many prompts; a memory whose budget is partly empty trims it."""
        return state

    def slot_filled(self, state: State) -> Tensor:
        """(b s) bool: which slots hold something (an empty slot is left out of slot statistics)."""
        b = next(iter(state.values())).shape[0]
        return torch.ones(b, self.cfg.slots, dtype=torch.bool)

    def describe(self, state: State) -> dict:
        """Plain numbers about what the state of sequence 0 holds (e.g. entries kept and why), for reports."""
        return {}

    def holds(self, state: State, ids: Tensor, byte: Tensor) -> Tensor:
        """(b) bool: whether each row's state holds the exact entry "the context ending at ids' last
        byte (b p) -> byte (b)". Only for memories with `exact_context`."""
        raise NotImplementedError(f"{type(self).__name__} keeps no exact entries")

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of matrices that AdamW must not decay (e.g. lookup tables)."""
        return set()

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

    def write_over(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        """`write`, for a caller that never uses `state` again (writing a long text segment by
        segment): a memory may then update the state's tensors in place instead of copying them."""
        return self.write(h, seg, state, surprise)

    def _record(self, **tensors: Tensor) -> None:
        if self.observe:
            self.observed.append({k: v.detach().float().cpu() for k, v in tensors.items()})
