"""LinformerMemory: the notes' Implicit Memory Module, kept as they describe it.

S slots of width d. Read: tokens attend over the slots with cosine scores / temperature, and the
read enters the residual stream through a learned per-token gate. Write: the slots attend over the
segment's tokens (Linformer: the length n is projected onto S), and the candidate is merged with an
EMA at rate `lr`, then normalised. Pooling a whole segment into S averages is exactly why this
memory cannot hold a single fact seen once; it is kept as the baseline the notes measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, repeat
from torch import Tensor, nn

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import Memory, Segment, State


class LinformerMemory(Memory):
    def __init__(self, cfg: MemoryConfig, n_embd: int, block_size: int = 128, bias: bool = False) -> None:
        super().__init__(cfg, n_embd)
        d = n_embd
        self.temp = cfg.read_temp
        self.init_slots = nn.Parameter(torch.randn(cfg.slots, d) * 0.02)  # learned initial state
        self.q = nn.Linear(d, d, bias=bias)  # read queries
        self.k = nn.Linear(d, d, bias=bias)  # write keys: how strongly each token feeds each slot
        self.v = nn.Linear(d, d, bias=bias)  # write values: the content merged into the slots
        self.out = nn.Linear(d, d, bias=bias)
        self.gate = nn.Linear(d, 1)  # starts open (post_init) so the read path gets gradient

    def _normalise(self, x: Tensor) -> Tensor:
        if self.cfg.norm == "l2":
            return F.normalize(x, dim=-1)
        return F.layer_norm(x, x.shape[-1:])

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        slots = self._normalise(self.init_slots.to(device))
        return {"slots": repeat(slots, "s d -> b s d", b=batch)}

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        slots = state["slots"]
        scores = einsum(F.normalize(self.q(h), dim=-1), F.normalize(slots, dim=-1), "b n d, b s d -> b n s")
        attn = torch.softmax(scores / self.temp, dim=-1)
        read = self.out(einsum(attn, slots, "b n s, b s d -> b n d"))
        gate = torch.sigmoid(self.gate(h))  # (b n 1)
        self._record(read_attn=attn, gate=gate.squeeze(-1))
        return gate * read

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        slots = state["slots"]
        scores = einsum(F.normalize(slots, dim=-1), F.normalize(self.k(h), dim=-1), "b s d, b n d -> b s n")
        attn = torch.softmax(scores / self.temp, dim=-1)  # each slot pools the segment (length n -> S)
        candidate = einsum(attn, self.v(h), "b s n, b n d -> b s d")
        self._record(write_attn=attn)
        new = self._normalise((1 - self.cfg.lr) * slots + self.cfg.lr * candidate)
        # a constant or zero merge (possible at lr = 1) has no direction to normalise: keep the old slot
        expected = 1.0 if self.cfg.norm == "l2" else new.shape[-1] ** 0.5
        degenerate = new.norm(dim=-1, keepdim=True) < 0.5 * expected
        return {"slots": torch.where(degenerate, slots, new)}

    def slot_vectors(self, state: State) -> Tensor:
        return state["slots"]
