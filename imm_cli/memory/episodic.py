"""EpisodicMemory: S slots of exact key/value entries, written once, recalled by context.

Each write takes one segment and keeps up to `entries` of its positions as separate entries
(all of them by default; with fewer, the most surprising first):
  key   = the `key_bytes` bytes ending at position i, as a learned n-gram embedding;
  value = the byte that followed position i (stored as its id, read through a learned embedding).
The entries go into one slot: an empty one first, else the slot of lowest importance (mean
surprise of its entries, multiplied by `decay` at each later write, so old and unsurprising
segments are replaced first).

Reading is attention of each position's own n-gram query over every stored entry (cosine scores,
learned temperature) plus a learned "nothing matches" option, so a fresh memory reads exactly
zero. With `local`, a position also reads the entries of its own segment's earlier positions (the
same lookup for a fact still inside the window). When a cue repeats a stored context, the read
carries the byte that followed it; once that byte is produced, the next context matches the next
entry, and so on through the fact.

Why not pooled averages (LinformerMemory): averaging a segment into S vectors blurs one fact among
a hundred bytes of other text; a fact seen once is only recoverable if its bytes are kept apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import PAD, Memory, Segment, State


class EpisodicMemory(Memory):
    def __init__(self, cfg: MemoryConfig, n_embd: int, bias: bool = False, block_size: int = 128) -> None:
        super().__init__()
        self.cfg = cfg
        self.entries = cfg.entries or block_size  # 0 = keep every position of a written segment
        K, dk = cfg.key_bytes, cfg.key_dim
        # one byte table per offset (0 = the current byte): the sum is an n-gram embedding;
        # recent bytes start with larger weight so a near-miss context scores below an exact one
        scale = torch.tensor([1.0 / math.sqrt(1 + t) for t in range(K)])
        self.key_emb = nn.Parameter(torch.randn(K, PAD + 1, dk) * scale[:, None, None])
        dv = cfg.value_dim or n_embd
        self.value_emb = nn.Embedding(PAD + 1, dv)  # content of a stored next byte
        self.out = nn.Linear(dv, n_embd, bias=bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.read_temp)))  # learned 1/temperature
        self.null_cos = nn.Parameter(torch.tensor(0.6))  # below this cosine a stored entry loses to "nothing"
        self.gate = nn.Linear(n_embd, 1)

    # --- keys ----------------------------------------------------------------------------------
    def context_keys(self, seg: Segment) -> Tensor:
        """(b n dk) unit vectors: the n-gram of the `key_bytes` bytes ending at each position."""
        return self._ngram(seg.ids, seg.prev)

    def _ngram(self, ids: Tensor, prev: Tensor) -> Tensor:
        K = self.cfg.key_bytes
        b, n = ids.shape
        prev = prev[:, -(K - 1):] if K > 1 else prev[:, :0]
        parts = [prev, ids]
        if prev.shape[1] < K - 1:  # the stream's start: pad the missing context
            parts.insert(0, torch.full((b, K - 1 - prev.shape[1]), PAD, dtype=ids.dtype, device=ids.device))
        stream = torch.cat(parts, dim=1)  # (b, n + K - 1)
        windows = stream.unfold(1, K, 1).flip(-1)  # (b n K): offset 0 = the current byte
        offsets = torch.arange(K, device=stream.device) * (PAD + 1)  # row of (offset, byte) in the flat table
        # sum over the K offsets of key_emb[offset, byte], as one embedding bag (no (b n K dk) tensor)
        table, idx = self.key_emb.reshape(K * (PAD + 1), -1), (windows + offsets).reshape(b * n, K)
        if torch.is_grad_enabled() and table.requires_grad:
            emb = _NGramBag.apply(table, idx)
        else:  # generation: no autograd.Function overhead per byte
            emb = F.embedding_bag(idx, table, mode="sum")
        return F.normalize(emb.view(b, n, -1), dim=-1)

    # --- interface -----------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        S, E, dk = self.cfg.slots, self.entries, self.cfg.key_dim
        return {
            "keys": torch.zeros(batch, S, E, dk, device=device),
            "bytes": torch.full((batch, S, E), PAD, dtype=torch.long, device=device),
            "valid": torch.zeros(batch, S, E, dtype=torch.bool, device=device),
            "importance": torch.full((batch, S), -math.inf, device=device),
        }

    def lookup(self, seg: Segment, state: State) -> tuple[Tensor, Tensor]:
        """Attention of each position over the stored entries (and its own segment's, with `local`).

        Returns (per_byte (b n 257): attention mass summed per stored next-byte id, attn (b n m+w-1)
        over the m stored entries then, with `local`, the window's positions but its last).
        The "nothing matches" share is what is missing from 1 in per_byte's sum.
        """
        n = seg.ids.shape[1]
        window, window_prev = (seg.ids, seg.prev) if seg.window is None else (seg.window, seg.window_prev)
        b, w = window.shape
        if seg.cache is not None:  # incremental: the earlier window positions' keys are cached
            new = self._ngram(seg.ids, seg.prev)
            cached = seg.cache.memory_keys
            kw = new if cached is None or w == n else torch.cat([cached, new], dim=1)
            seg.cache.memory_keys = kw
        else:
            kw = self._ngram(window, window_prev)  # (b w k): the context ending at each window position
        scale = self.log_scale.exp()
        q = kw[:, w - n :] * scale  # (b n k)
        keys = state["keys"].flatten(1, 2)  # (b m k), m = slots x entries
        valid = state["valid"].flatten(1)[:, None, :]  # (b 1 m)
        scores = [torch.bmm(q, keys.transpose(1, 2)).masked_fill(~valid, -math.inf)]
        ids = [state["bytes"].flatten(1)]
        if self.cfg.local and w > 1:
            # this segment's own entries: position j's context -> byte j+1, readable once j+1 <= i
            # (the window's last position is nobody's entry yet, so it is left out)
            local = torch.bmm(q, kw[:, : w - 1].transpose(1, 2))  # (b n w-1)
            if n > 1:
                seen = torch.ones(n, w - 1, dtype=torch.bool, device=window.device).tril(w - n - 1)
                local = local.masked_fill(~seen, -math.inf)
            scores.append(local)
            ids.append(window[:, 1:])
        scores.append((scale * self.null_cos).expand(b, n, 1))
        attn = torch.softmax(torch.cat(scores, dim=-1), dim=-1)[..., :-1]  # (b n m+w-1), "nothing" dropped
        # values depend only on the stored byte: sum attention per byte id, then one small matmul
        per_byte = torch.zeros(b, n, PAD + 1, device=attn.device, dtype=attn.dtype)
        per_byte.scatter_add_(2, torch.cat(ids, dim=1)[:, None, :].expand(b, n, -1), attn)
        return per_byte, attn

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        per_byte, attn = self.lookup(seg, state)
        read = self.out(per_byte @ self.value_emb.weight)
        gate = torch.sigmoid(self.gate(h))
        if self.observe:
            S, E = self.cfg.slots, self.entries
            m = S * E
            self._record(read_attn=rearrange(attn[..., :m], "b n (s e) -> b n s e", s=S, e=E).sum(-1),
                         local_attn=attn[..., m:].sum(-1), gate=gate.squeeze(-1))
        return gate * read

    # --- a whole episode at once (training) ----------------------------------------------------
    def episode_at_once(self, segments: int, n: int) -> bool:
        """With every position kept and no slot ever evicted, what segment s reads is fixed by the bytes.

        Then segment s's state holds exactly the entries of segments 0..s-1 (key: the n-gram at each
        position, value: its next byte, valid where the target is known); surprise only orders the
        entries and sets slot importance, which matters for eviction alone. So all segments can read
        in one batched call. Conditions: every position kept (entries >= n), no eviction
        (segments <= slots), keys reach back no further than the previous segment (key_bytes - 1 <= n),
        and neither frozen nor observed.
        """
        return (not self.frozen and not self.observe and segments <= self.cfg.slots
                and self.entries >= n and self.cfg.key_bytes - 1 <= n)

    def read_episode(self, h: Tensor, seg: Segment) -> Tensor:
        """`read` of every segment of fresh episodes; h, seg.ids, seg.targets are (b*S n ...), S = seg.episode.

        Query t in segment s reads position p of an earlier segment as a stored entry (p's n-gram ->
        its target, if known), p < t of its own segment as a local entry (-> the byte after p), and the
        "nothing matches" option (key 0); the same set of scores the sequential path gives (only their
        order, hence float rounding, differs). Since targets are the next bytes (or -1, unknown), the
        byte an entry carries depends on p alone: the next byte of the stream inside a segment, the
        target at a segment's last position. So the read is a matmul of the attention with those
        bytes' values. Segment s only ever sees positions before (s+1)*n, so its queries are scored
        against that prefix alone (a loop over the few segments, not over positions).
        """
        S = seg.episode
        bs, n = seg.ids.shape
        b, L = bs // S, S * n
        stream = seg.ids.reshape(b, L)
        targets = seg.targets.reshape(b, L)
        kw = self._ngram(stream, stream[:, :0])  # (b L k): each segment's prev is the previous segment
        scale = self.log_scale.exp()
        # "nothing matches" as key 0, with an extra dimension holding null_cos for queries, 1 for the
        # null key and 0 for entries: one bmm gives every score, no (b t p) concatenation or rescale
        q = torch.cat([kw, self.null_cos.expand(b, L, 1)], dim=-1) * scale  # (b L k+1)
        null_key = F.pad(kw.new_ones(b, 1, 1), (kw.shape[-1], 0))
        keys = torch.cat([null_key, F.pad(kw, (0, 1))], dim=1)  # (b 1+L k+1)

        last = torch.arange(L, device=stream.device) % n == n - 1
        nxt = F.pad(stream[:, 1:], (0, 1), value=PAD)
        byte = torch.where(last, targets.masked_fill(targets < 0, PAD), nxt)  # (b L): what entry p carries
        # out(mix of values) = mix of out(values): project the 257 value rows first when that is the
        # cheaper side (values as wide as the stream), else mix the narrow values and project after
        fold = self.value_emb.weight.shape[1] >= self.out.out_features
        values = self.value_emb.weight @ self.out.weight.t() if fold else self.value_emb.weight  # (257 d) or (257 dv)
        entry_values = torch.cat([values.new_zeros(b, 1, values.shape[1]), F.embedding(byte, values)], dim=1)

        known = targets >= 0
        local = torch.ones(n, n, dtype=torch.bool, device=stream.device).tril(-1)  # p < t, same segment
        if not self.cfg.local:
            local = torch.zeros_like(local)
        reads = []
        for s in range(S):  # segment s sees "nothing" and positions 0..(s+1)n-1 only: skip the masked rest
            lo, hi = s * n, (s + 1) * n
            scores = torch.bmm(q[:, lo:hi], keys[:, : hi + 1].transpose(1, 2))  # (b t p), p = 0 is "nothing"
            allowed = torch.cat([known.new_ones(b, n, 1), known[:, None, :lo].expand(b, n, lo),
                                 local.expand(b, n, n)], dim=-1)
            attn = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
            reads.append(torch.bmm(attn, entry_values[:, : hi + 1]))  # "nothing" carries zeros
        read = torch.cat(reads, dim=1)
        if not fold:
            read = self.out(read)  # (b L dv) -> (b L d)
        elif self.out.bias is not None:
            read = read + self.out.bias
        gate = torch.sigmoid(self.gate(h))
        return gate * read.reshape(bs, n, -1)

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        b, n = seg.ids.shape
        S, E = self.cfg.slots, self.entries
        known = seg.targets >= 0
        score = surprise.masked_fill(~known, -math.inf)
        k = min(E, n)
        top, idx = score.topk(k, dim=1)  # (b k): the positions the model failed to predict most
        keys = torch.gather(self.context_keys(seg), 1, idx[..., None].expand(-1, -1, self.cfg.key_dim))
        valid = torch.isfinite(top)
        nxt = torch.gather(seg.targets, 1, idx).masked_fill(~valid, PAD)
        top = top.masked_fill(~valid, 0.0)
        if k < E:  # a segment shorter than a slot: pad with invalid entries
            keys = F.pad(keys, (0, 0, 0, E - k))
            nxt = F.pad(nxt, (0, E - k), value=PAD)
            valid = F.pad(valid, (0, E - k), value=False)
        count = valid.sum(1)
        importance_new = (top.sum(1) / count.clamp(min=1)).masked_fill(count == 0, -math.inf)

        aged = state["importance"] * self.cfg.decay  # -inf stays -inf: empty slots are taken first
        slot = aged.argmin(dim=1)  # (b)
        chosen = F.one_hot(slot, S).bool()  # (b s)
        self._record(write_slot=chosen.float(), write_positions=idx.float())
        sel = chosen[:, :, None]
        return {
            "keys": torch.where(sel[..., None], keys[:, None], state["keys"]),
            "bytes": torch.where(sel, nxt[:, None], state["bytes"]),
            "valid": torch.where(sel, valid[:, None], state["valid"]),
            "importance": torch.where(chosen, importance_new[:, None], aged),
        }

    def slot_vectors(self, state: State) -> Tensor:
        """Mean stored value of each slot, mapped like a read (zeros for an empty slot)."""
        valid = state["valid"].float()[..., None]
        values = self.value_emb(state["bytes"])
        mean = (values * valid).sum(2) / valid.sum(2).clamp(min=1)
        return self.out(mean)


class _NGramBag(torch.autograd.Function):
    """F.embedding_bag(idx, table, mode="sum") whose backward is one index_add_.

    The built-in backward sorts the (b*n*K) indices first; with every row of the small key table
    touched anyway, scattering the gradient rows straight into a dense table is several times faster.
    """

    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = table.shape[0]
        return F.embedding_bag(idx, table, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, grad.shape[1])
        # offset-major order (all positions' offset-0 rows, then offset 1, ...): about twice as fast
        # as position-major here, since consecutive adds then land in one offset's 257-row block
        out.index_add_(0, idx.t().reshape(-1), grad.repeat(idx.shape[1], 1))
        return out, None
