"""KNNMemory: Memorizing Transformers (Wu, Rabe, Hutchins and Szegedy, ICLR 2022), small and faithful.

The paper gives one layer an external memory of the (key, value) pairs its attention computed on
earlier segments, and lets each query attend to the k stored keys that match it best. Per head
(H = 4 here), with h_i the layer's hidden state at position i:

  write (after a segment, every position i):   k_i = W_k h_i / |W_k h_i|,   v_i = W_v h_i
      appended to a FIFO memory of at most `size` entries (the oldest entries are dropped first);
      stored with no gradient (the paper does not backpropagate into the external memory).
  read (every position of the next segments):   q = W_q h / |W_q h|
      s_j = exp(tau) * q . k_j                    for the top-k stored keys j (k = `topk`; 0 = 32)
      a_j = softmax_j(s_j),   m = sum_j a_j v_j   (the memory attention's output)
  gate:  the paper mixes memory and local attention with a learned per-head gate,
      V_a = g * m + (1 - g) * V_local,   g = sigmoid(b_g).

Keys and queries are normalised, as the paper does against stale keys, so scores are cosines; a
learned scale exp(tau) (initialised at 1 / --memory-temp) makes the softmax sharp.

How it sits in this model's seam. The host block's own causal attention is the local attention,
and the memory's read is added to the residual stream after it: read = W_o concat_h(g_h * m_h),
the gated memory term of the paper's sum (the block's attention plays the (1 - g) V_local part,
without the (1 - g) factor). The gate g = sigmoid(w_g . h + b_g) is a Linear per head whose weight
starts at zero (`post_init`): at initialisation it is exactly the paper's per-head scalar gate, and
it may learn to depend on the token as the other memories' gates do. The seam hands the memory h,
not the host block's attention projections, so the memory has its own W_k and W_v; with writes
detached as in the paper they never receive a gradient, so they are fixed random projections of h
(requires_grad False: the optimizer and DDP skip them). W_q, W_o, the gate and tau learn.

A fresh memory holds no entry and reads exactly zero (W_o has no bias). Reads do not depend on the
order of stored entries (ties in the top-k aside): eviction follows each entry's age, not its index.

State (one row per sequence, M = `size`):
  keys   (b M H dk)  unit keys per head (zeros where empty)
  values (b M dv)    values, the heads' dv / H channels side by side (dv = --memory-value-dim or d)
  age    (b M)       stream position of the entry's byte (0, 1, 2, ... per sequence); -1 = empty
  count  (b)         positions written so far
Slots: the buffer is cut into `slots` equal regions of entry indices (as the episodic memory's);
empty entries are filled in index order, so the regions fill one after another and then, as a ring,
the oldest region is overwritten. slot_vectors = W_o (mean stored value of the region).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import Memory, Segment, State

HEADS = 4  # memory attention heads (fewer where key_dim or the value width is not divisible by 4)
DEFAULT_TOPK = 32  # stored entries each query reads when --memory-topk is 0 (the paper's experiments use 32)


def heads_for(*widths: int) -> int:
    """The largest head count of HEADS, HEADS/2, ..., 1 that divides every width."""
    h = HEADS
    while h > 1 and any(w % h for w in widths):
        h //= 2
    return h


class KNNMemory(Memory):
    def __init__(self, cfg: MemoryConfig, n_embd: int, block_size: int = 128, bias: bool = False) -> None:
        super().__init__(cfg, n_embd)
        self.size = cfg.size
        dv = cfg.value_dim or n_embd
        self.heads = heads_for(cfg.key_dim, dv)
        self.q = nn.Linear(n_embd, cfg.key_dim, bias=False)
        self.k = nn.Linear(n_embd, cfg.key_dim, bias=False)  # fixed: written keys get no gradient
        self.v = nn.Linear(n_embd, dv, bias=False)  # fixed: written values get no gradient
        self.k.requires_grad_(False)
        self.v.requires_grad_(False)
        self.out = nn.Linear(dv, n_embd, bias=False)  # no bias: an empty memory reads exactly zero
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.read_temp)))  # tau
        self.gate = nn.Linear(n_embd, self.heads)  # g per head; starts as the constant sigmoid(gate_bias)

    # --- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        M, H = self.size, self.heads
        return {
            "keys": torch.zeros(batch, M, H, self.cfg.key_dim // H, device=device),
            "values": torch.zeros(batch, M, self.v.out_features, device=device),
            "age": torch.full((batch, M), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch, dtype=torch.long, device=device),
        }

    def slot_of_entries(self, device=None) -> Tensor:
        """(size) the slot (region of the buffer) each entry index belongs to."""
        return torch.arange(self.size, device=device) * self.cfg.slots // self.size

    def _per_slot(self, x: Tensor) -> Tensor:
        """(b M ...) summed over each slot's region of entries -> (b S ...)."""
        out = x.new_zeros(x.shape[0], self.cfg.slots, *x.shape[2:])
        return out.index_add_(1, self.slot_of_entries(x.device), x)

    def slot_filled(self, state: State) -> Tensor:
        return self._per_slot((state["age"] >= 0).float()) > 0

    def slot_vectors(self, state: State) -> Tensor:
        """W_o applied to the mean stored value of each slot's region (zeros for an empty slot)."""
        valid = (state["age"] >= 0).float()[..., None]
        total, count = self._per_slot(state["values"] * valid), self._per_slot(valid)
        return self.out(total / count.clamp(min=1))

    # --- reading -------------------------------------------------------------------------------
    def _split(self, x: Tensor) -> Tensor:
        """(b n H*w) -> (b H n w)."""
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        b, n, _ = h.shape
        g = torch.sigmoid(self.gate(h))  # (b n H)
        valid = state["age"] >= 0
        filled = valid.any(0).nonzero()
        hi = int(filled.max()) + 1 if len(filled) else 0  # entries past hi are empty in every row
        if hi == 0:  # nothing stored: the memory term is exactly zero
            if self.observe:
                self._record(read_attn=h.new_zeros(b, n, self.cfg.slots), gate=g.mean(-1))
            return h.new_zeros(b, n, self.n_embd)
        keys = state["keys"][:, :hi].transpose(1, 2)  # (b H hi dk)
        q = F.normalize(self._split(self.q(h)), dim=-1) * self.log_scale.exp()  # (b H n dk)
        scores = q @ keys.transpose(-1, -2)  # (b H n hi): scaled cosines
        if not valid[:, :hi].all():
            scores = scores.masked_fill(~valid[:, None, None, :hi], -math.inf)
        top, idx = scores.topk(min(self.cfg.topk or DEFAULT_TOPK, hi), dim=-1)  # (b H n k)
        found = torch.isfinite(top)
        # softmax over the retrieved entries; a query with fewer stored entries than k ignores the
        # missing ones (weight exactly 0), and a row with none reads exactly 0
        attn = torch.softmax(top.masked_fill(~found, torch.finfo(top.dtype).min), dim=-1) * found
        values = self._split(state["values"][:, :hi])  # (b H hi dv)
        dv = values.shape[-1]
        picked = values[:, :, None].expand(-1, -1, n, -1, -1).gather(3, idx[..., None].expand(-1, -1, -1, -1, dv))
        m = (attn[..., None] * picked).sum(3)  # (b H n dv)
        read = self.out((m * g.transpose(1, 2)[..., None]).transpose(1, 2).reshape(b, n, -1))
        if self.observe:
            region = self.slot_of_entries(h.device)[idx]  # (b H n k)
            mass = torch.zeros(*idx.shape[:3], self.cfg.slots, device=h.device).scatter_add_(-1, region, attn)
            self._record(read_attn=mass.mean(1), gate=g.mean(-1))
        return read

    # --- writing -------------------------------------------------------------------------------
    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        b, n, _ = h.shape
        k = min(n, self.size)  # a segment longer than the budget keeps only its last `size` positions
        h = h[:, n - k:].detach()  # no backpropagation into the memory (the paper's stop-gradient)
        new_keys = F.normalize(self._split(self.k(h)), dim=-1).transpose(1, 2)  # (b k H dk)
        new_values = self.v(h)  # (b k dv)
        new_age = state["count"][:, None] + (n - k) + torch.arange(k, device=h.device)  # (b k)
        # FIFO: the k oldest entries (empty ones, age -1, first, in index order) take the new positions
        where = torch.sort(state["age"], dim=1, stable=True).indices[:, :k]  # (b k)
        keys = state["keys"].scatter(1, where[:, :, None, None].expand_as(new_keys), new_keys.to(state["keys"].dtype))
        values = state["values"].scatter(1, where[..., None].expand_as(new_values), new_values.to(state["values"].dtype))
        age = state["age"].scatter(1, where, new_age)
        if self.observe:
            written = torch.zeros(b, self.size, device=h.device).scatter_(1, where, 1.0)
            self._record(write_slot=self._per_slot(written) / k, written=torch.full((b,), float(k)))
        return {"keys": keys, "values": values, "age": age, "count": state["count"] + n}
