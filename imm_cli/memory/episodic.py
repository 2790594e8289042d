"""EpisodicMemory: a budget of exact key/value entries, kept by surprise, recalled by context.

State: up to `size` entries per sequence (the budget). Each write takes one segment and offers up
to `entries` of its positions (all by default), most surprising first:
  key   = the `key_bytes` bytes ending at position i, as a learned n-gram embedding (unit vector);
  value = the byte that followed position i (stored as its id, read through a learned embedding);
  score = how surprising the span around position i was when it was written: the mean of the
          model's per-byte loss over i and the span // 2 positions on each side, for
          a byte the model was not sure of (p <= 0.97); a byte it predicted with p > 0.97
          keeps its own, low, loss: it needs no entry, the model produces it itself.
          With `trail` (the default), the higher of that centred mean and the mean over the `span`
          bytes up to and including i: a fact's last bytes have the easy text after the fact in
          half of their centred span, and were the ones let go (measured on 64 facts in 32 KB,
          three document draws x two trainings: 0.55 exact match centred, 0.63 with `trail`).
          (Exempting more costs facts: recalled from another context, a byte the model was
          fairly sure of at writing is often missed, the read of other entries pulling it away.
          Measured on 64 facts in 32 KB, 16,384 entries, three draws x two trainings, with spans
          across segments: 0.75 exempting p > 3/4, 0.80 p > 0.9, 0.82 p > 0.97, 0.79 nothing.)
          A span runs across segment boundaries as the text does: the state carries the loss of
          the last span - 1 bytes written, and a mean leaves out bytes not yet written. (It used
          to stop at the segment's edge and repeat the edge byte in their place, which weighed one
          byte up to 32 times for about half of all positions: 64 facts in 32 KB, three draws x
          two trainings, 0.69 and 0.68 that way, 0.76 and 0.74 across boundaries.)
Retention is per entry: an offered entry replaces the lowest-scored stored entry when it scores
higher, so the memory always holds the `size` best-scored entries it was offered (scores
multiplied by `decay` at each write; 1.0, the default, means age alone never evicts anything).
Why a span: a fact is a run of surprising bytes, and its recall needs every byte of the run the
model cannot predict; a byte's own loss ranks scattered hard bytes of ordinary text (names, line
starts) level with a fact's, while the span's mean keeps the fact's whole run together (measured
on a 16 KB haystack with the default run: 41% of a fact's bytes kept by own loss, 99% by a
32-byte span). Titans (Behrouz et al. 2024) carries surprise forward with momentum for the same
reason: what follows a surprising event is worth remembering with it.

Reading: each position's own n-gram query is scored (cosine, learned temperature) against every
stored entry; only the `topk` best-matching entries enter the softmax, beside a learned "nothing
matches" option (so a fresh memory reads exactly zero). Top-k keeps the read as sharp with 65,536
entries as with 512: without it the softmax mass of thousands of near-misses drowns the one true
match (Memorizing Transformers, Wu et al. 2022, retrieve top-k for the same reason). The same
cosines feed a second, sharp softmax at a fixed 1/temperature (`sharp`, 48) with its own
"nothing matches" level: training pulls the learned temperature soft (about
1/14), because a blurred read of many similar contexts is a good n-gram model of ordinary text,
but at that temperature a context sharing 12 of its 16 bytes with the cue scores almost as high
as the exact one, and among thousands of entries the fact loses to such near-misses (measured on
the default run before this channel: 64 facts in 32 KB, 0.19 exact match at 1/14, 0.50 at 3x that).
Fixed, the sharp read cannot drift into the soft one's role. Both channels read one value table
(`shared_values`): an entry's two weights are added before its value is gathered, so mixing
costs one channel's work, and the table is the learned byte values themselves (value_dim 0; a
narrower value_dim projects them). Each channel's own projection, the design before, trained
no better and cost 2 to 3% of a training step (README "Performance"). With
`local`, a position also reads its own segment's earlier positions (the same lookup for a fact
still inside the window). When a cue repeats a stored context, the read carries the byte that
followed it; once that byte is produced, the next context matches the next entry, and so on.

Far key (inference only, `far_weight` > 0): facts that share a phrase longer than key_bytes
("... was awarded the Lindqvist Medal in 1987") have the same key at the answer, and the read
cannot tell them apart. At inference a key also carries sqrt(far_weight) x a unit n-gram of the
`far_bytes` bytes before its own, from a fixed random table (a hash of those bytes: neither learned
nor saved), so a dot product is the near cosine + far_weight x the far cosine: among entries whose
key_bytes match, the one whose earlier bytes match too wins, while a near cosine below 1 -
far_weight still loses to an exact one. The exact-context test (knn_exact) reads the near key
alone. Training never sees it (measured: 32-byte keys cost single facts, a learned far key costs
training steps; README "Memory that lasts").

Slots: the budget is cut into `slots` equal regions of the entry buffer (slot j holds entries
j*size/slots .. (j+1)*size/slots - 1). A slot is where entries live, not a unit of writing: the
usage analysis reports how reads and writes spread over these regions.

Why not pooled averages (LinformerMemory): averaging a segment into S vectors blurs one fact among
a hundred bytes of other text; a fact seen once is only recoverable if its bytes are kept apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import PAD, Memory, Segment, State

SURE = -math.log(0.97)  # a byte predicted with p > 0.97 (loss below this) is scored by its own loss
GATHER_K = 32  # up to this many stored entries per query, their values are gathered; beyond, summed per byte id
READ_CHUNK = 8192  # stored entries scored per matmul when taking the top-k (bounds memory at 65K entries)
UNSEEN = -1e9  # the cosine an unseen entry reads as: times any scale above 1e-7 its softmax weight is exactly 0
HEAP_K = 16  # top-k of at most this many is padded to 64 k columns on CPU (see _topk)
ENTRY_FIELDS = ("keys", "bytes", "score", "born")  # the state's tensors indexed by entry (b M ...)
EXACT_COS = 0.999  # a stored context this close to the query's is the same bytes (knn_exact): float rounding aside
FAR_DIM, FAR_SEED = 16, 1337  # the far key: width, and the seed of its fixed table (the same in every process)


@dataclass
class EpisodicCache:
    """Decoding: the n-gram keys and bytes of the window so far (the local entries), so a step computes one key."""

    keys: Tensor | None = None  # (b w dk)
    bytes: Tensor | None = None  # (b w)

    def repeat_interleave(self, r: int) -> None:
        self.keys, self.bytes = self.keys.repeat_interleave(r, dim=0), self.bytes.repeat_interleave(r, dim=0)


class EpisodicMemory(Memory):
    def __init__(self, cfg: MemoryConfig, n_embd: int, block_size: int = 128, bias: bool = False) -> None:
        super().__init__(cfg, n_embd)
        self.size = cfg.size  # the budget in entries
        self.per_write = cfg.entries or block_size  # 0 = offer every position of a written segment
        self.exact_context = cfg.key_bytes  # an entry is keyed by exactly this many bytes of context
        K, dk = cfg.key_bytes, cfg.key_dim
        # one byte table per offset (0 = the current byte): the sum is an n-gram embedding;
        # recent bytes start with larger weight so a near-miss context scores below an exact one
        scale = torch.tensor([1.0 / math.sqrt(1 + t) for t in range(K + cfg.far_bytes)])
        self.key_emb = nn.Parameter(torch.randn(K, PAD + 1, dk) * scale[:K, None, None])
        if cfg.far_bytes:  # the far key's table: fixed random (a hash of the far bytes), neither learned nor saved
            far = torch.randn(cfg.far_bytes, PAD + 1, FAR_DIM, generator=torch.Generator().manual_seed(FAR_SEED))
            self.register_buffer("far_emb", far * scale[K:, None, None], persistent=False)
        # a stored next byte's value as a read adds it to the residual stream: one table both read
        # channels read (shared_values; their weights add before the values are gathered), a
        # byte's row learned directly at full width, or through `out` from value_dim; without
        # shared_values (runs from before), each channel projects value_emb through its own Linear
        dv = cfg.value_dim or n_embd
        self._projected = bool(cfg.value_dim) or not cfg.shared_values  # value_emb reaches the table through `out`
        self.value_emb = nn.Embedding(PAD + 1, dv)
        if self._projected:
            self.out = nn.Linear(dv, n_embd, bias=bias)
        else:  # the table itself, initialised as a fresh embedding x projection would be (std 1/sqrt 3)
            nn.init.normal_(self.value_emb.weight, std=3 ** -0.5)
        # the read's bias where no projection carries one
        self.value_bias = nn.Parameter(torch.zeros(n_embd)) if bias and not self._projected else None
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.read_temp)))  # learned 1/temperature
        self.null_cos = nn.Parameter(torch.tensor(0.6))  # below this cosine a stored entry loses to "nothing"
        self.gate = nn.Linear(n_embd, 1)
        self._kept_table: tuple | None = None  # (weights' identity, table) for reads without autograd
        if cfg.sharp:  # the sharp read: its own "nothing matches" level (and, without shared_values, projection)
            self.sharp_null = nn.Parameter(torch.tensor(0.9))
            if not cfg.shared_values:
                self.sharp_out = nn.Linear(dv, n_embd, bias=bias)
        if cfg.keep:  # a learned keep score: will a later cue read this entry sharply? (trained in read_episode)
            self.keep_head = nn.Linear(n_embd, 1)
        if cfg.copy:  # per position, how much of the sharp read's next-byte distribution the output takes
            self.copy_gate = nn.Linear(n_embd, 1)

    def train(self, mode: bool = True) -> "EpisodicMemory":
        """Also forgets the kept value table: a fused AdamW step (make_optimizer's, on CPU and CUDA)
        updates weights without bumping their version counters, so a table kept from one validation
        would otherwise be read, stale, by the next (it was: in-training validation loss 1.575
        against 1.564 for the same weights loaded afresh)."""
        self._kept_table = None
        return super().train(mode)

    @property
    def copies(self) -> bool:
        """Whether a read proposes next bytes for the output: always with the learned `copy` weight,
        at inference (not in training) with the fixed `knn_lm` weight."""
        return self.cfg.copy or (self.cfg.knn_lm > 0 and not self.training)

    def no_weight_decay(self) -> set[str]:
        return {"key_emb"}  # a lookup table: decay would pull rare bytes' keys towards zero

    # --- keys ----------------------------------------------------------------------------------
    @property
    def far_on(self) -> bool:
        """Whether keys carry the far key: at inference, with far_bytes and a far_weight (training
        never sees it: it costs training nothing and changes nothing the model learns)."""
        return bool(self.cfg.far_bytes and self.cfg.far_weight) and not self.training

    @property
    def key_width(self) -> int:
        """The width of a stored key: the near key (key_dim), then, with far_on, the far one."""
        return self.cfg.key_dim + (FAR_DIM if self.far_on else 0)

    def context_keys(self, seg: Segment) -> Tensor:
        """(b n key_width) each position's key: the unit n-gram of the `key_bytes` bytes ending there;
        with far_on, then sqrt(far_weight) x the unit n-gram (fixed random table) of the far_bytes
        before those, so a dot product of keys is the near cosine + far_weight x the far cosine."""
        return self._ngram(seg.ids, seg.prev)

    def _ngram(self, ids: Tensor, prev: Tensor) -> Tensor:
        b, n = ids.shape
        return self._keys(self._ngram_rows(ids, prev)).view(b, n, -1)

    def _keys(self, rows: Tensor) -> Tensor:
        """(R key_width) the keys of the rows (R K[+F]) of _ngram_rows, with autograd when it is on."""
        K = self.cfg.key_bytes
        table, idx = self.key_emb.reshape(K * (PAD + 1), -1), rows[:, :K]
        near = _NGramKey.apply(table, idx) if torch.is_grad_enabled() and table.requires_grad else _unit_keys(table, idx)
        if rows.shape[1] == K:
            return near
        far = _unit_keys(self.far_emb.reshape(-1, FAR_DIM), rows[:, K:] - K * (PAD + 1))
        return torch.cat([near, math.sqrt(self.cfg.far_weight) * far], -1)

    def _ngram_rows(self, ids: Tensor, prev: Tensor) -> Tensor:
        """Per position of ids (b n), the key tables' rows (b*n K[+F]) whose sums are its keys: offset t's
        byte c is row t*257 + c, offset 0 the current byte; with far_on, offsets K.. (far_emb's, from
        row K*257) continue into the far_bytes before the near ones."""
        K = self._context_bytes()
        b, n = ids.shape
        prev = prev[:, -(K - 1):] if K > 1 else prev[:, :0]
        parts = [prev, ids]
        if prev.shape[1] < K - 1:  # the stream's start: pad the missing context
            parts.insert(0, torch.full((b, K - 1 - prev.shape[1]), PAD, dtype=ids.dtype, device=ids.device))
        stream = torch.cat(parts, dim=1)  # (b, n + K - 1)
        windows = stream.unfold(1, K, 1).flip(-1)  # (b n K): offset 0 = the current byte
        offsets = torch.arange(K, device=stream.device) * (PAD + 1)  # row of (offset, byte) in the flat table
        # a sum over the K offsets of key_emb[offset, byte] is one embedding bag (no (b n K dk) tensor)
        return (windows + offsets).reshape(b * n, K)

    # --- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        M, dk = self.size, self.key_width
        return {
            "keys": torch.zeros(batch, M, dk, device=device),
            "bytes": torch.full((batch, M), PAD, dtype=torch.long, device=device),
            "score": torch.full((batch, M), -math.inf, device=device),  # retention score; -inf = empty
            "born": torch.zeros(batch, M, dtype=torch.long, device=device),  # the write that stored the entry
            "writes": torch.zeros(batch, dtype=torch.long, device=device),  # writes so far
            # the loss of the last span - 1 bytes written (-inf: none yet), for spans across segments
            "before": torch.full((batch, max(self.cfg.span - 1, 0)), -math.inf, device=device),
        }

    def read_only(self, state: State) -> State:
        """Only the buffer up to the last stored entry (writes fill it from index 0): a 512-entry
        memory repeated for 256 prompts copies 512 entries each, not the 16,384 of the budget.
        Not for writing: the budget would be lost."""
        end = _stored_end(torch.isfinite(state["score"]))
        return {k: (v[:, :end] if k in ENTRY_FIELDS else v) for k, v in state.items()}

    def holds(self, state: State, ids: Tensor, byte: Tensor) -> Tensor:
        q = self._ngram(ids[:, -1:], ids[:, :-1])  # (b 1 dk) the key of the context ending at the last byte
        dk = self.cfg.key_dim  # the near keys: the very same key_bytes of context
        same = torch.einsum("bmd,bnd->bm", state["keys"][..., :dk], q[..., :dk]) > 1 - 1e-4
        return (same & (state["bytes"] == byte[:, None]) & torch.isfinite(state["score"])).any(1)

    def slot_of_entries(self, device=None) -> Tensor:
        """(size) the slot (region of the buffer) each entry index belongs to."""
        return torch.arange(self.size, device=device) * self.cfg.slots // self.size

    def slot_filled(self, state: State) -> Tensor:
        valid = torch.isfinite(state["score"]).float()  # (b M)
        per_slot = torch.zeros(valid.shape[0], self.cfg.slots, device=valid.device)
        per_slot.index_add_(1, self.slot_of_entries(valid.device), valid)
        return per_slot > 0

    def describe(self, state: State) -> dict:
        """What sequence 0's memory keeps: how full the budget is, the surprise of what stayed (the
        retention score), and how old the kept entries are (in writes, i.e. segments, before the last)."""
        score, born, writes = state["score"][0], state["born"][0], int(state["writes"][0])
        kept = torch.isfinite(score)
        n = int(kept.sum())
        if n == 0:
            return {"entries": 0, "budget": self.size, "writes": writes}
        age = (writes - 1 - born[kept]).float()
        s = score[kept].float()
        return {"entries": n, "budget": self.size, "writes": writes,
                "score_min": float(s.min()), "score_median": float(s.median()), "score_max": float(s.max()),
                "age_median": float(age.median()), "age_max": float(age.max()),
                "kept_from_first_half": float((age >= writes / 2).float().mean())}

    # --- reading -------------------------------------------------------------------------------
    def _stored_topk(self, q: Tensor, state: State) -> tuple[Tensor, Tensor]:
        """Cosines (b n k) and indices (b n k) of the `topk` best-matching stored entries of each query.

        The k entries are chosen without autograd, then their cosines recomputed with it: the
        gradient then flows through k entries per query, not through a dense (b n M) score matrix.
        """
        keys, valid = state["keys"], torch.isfinite(state["score"])
        # only up to the last stored entry: writes fill the buffer from index 0 (see _write), so a
        # memory holding 512 entries of a 16,384 budget costs a read over 512
        end = _stored_end(valid)
        keys, valid = keys[:, :end], valid[:, :end]
        b, M, dk = keys.shape
        k = min(self.cfg.topk or M, M)
        if k == 0:  # nothing stored yet (the first segment of a whole-episode read)
            return q.new_zeros(*q.shape[:2], 0), torch.zeros(*q.shape[:2], 0, dtype=torch.long, device=q.device)
        if k == M:  # every entry is read (dense, or fewer stored than k): no selection to make
            cos = torch.bmm(q, keys.transpose(1, 2)).masked_fill(~valid[:, None], UNSEEN)
            return cos, torch.arange(M, device=q.device).expand_as(cos)
        with torch.no_grad():
            # masking a large (b n M) score matrix costs about half the matmul, and there are usually
            # no empty entries before the last stored one; a small one (decoding) is masked at once
            holes = q.shape[1] * M < 65_536 or not bool(valid.all())
            best_s, best_i = [], []
            for c in range(0, M, READ_CHUNK):
                s = torch.bmm(q, keys[:, c:c + READ_CHUNK].transpose(1, 2))
                if holes:
                    s = s.masked_fill_(~valid[:, None, c:c + READ_CHUNK], -math.inf)
                if k < s.shape[-1]:
                    s, i = _topk(s, k)
                else:
                    i = torch.arange(s.shape[-1], device=s.device).expand_as(s)
                best_s.append(s)
                best_i.append(i + c)
            s, i = torch.cat(best_s, -1), torch.cat(best_i, -1)
            if s.shape[-1] > k:  # several chunks: the best k of their winners
                s, j = _topk(s, k)
                i = i.gather(-1, j)
        if not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad)):
            return s.clamp_(min=UNSEEN), i
        return _chosen_cosines(q, keys, s, i), i

    def _stored(self, q: Tensor, state: State) -> tuple:
        """The top-k stored entries of each query: cosines (b n k), indices and byte ids (b n k), and
        where the exact-context test needs them (`_near_needed`), their near keys' cosines (b n k)."""
        q = _fit(q, state["keys"].shape[-1])  # a state written in the other mode: the part both have
        cos, idx = self._stored_topk(q, state)
        ids = state["bytes"].gather(1, idx.flatten(1)).view_as(idx)
        if not self._near_needed():
            return cos, idx, ids
        if not self.cfg.topk or idx.shape[-1] < self.cfg.topk:  # fewer stored than k, or dense: idx is 0..M-1
            dk, M = self.cfg.key_dim, idx.shape[-1]  # one matmul, not a (b n M dk) gather (GBs at 65K entries)
            near = torch.bmm(q[..., :dk], state["keys"][:, :M, :dk].transpose(1, 2))
            return cos, idx, ids, near.masked_fill(cos <= UNSEEN, UNSEEN)
        return cos, idx, ids, self._near_at(q, state["keys"], idx, cos)

    def _near_needed(self) -> bool:
        """Whether a read also scores its entries by the near keys alone: with the far key on, for the
        kNN-LM mix's exact-context test (the same key_bytes of context, whatever came before them)."""
        return self.far_on and self.copies and not self.cfg.copy and self.cfg.knn_exact > self.cfg.knn_lm

    def _near_at(self, q: Tensor, keys: Tensor, idx: Tensor, best: Tensor) -> Tensor:
        """(b n k) the near keys' cosines of queries q (b n D) with keys (b M D) at idx (b n k)."""
        return _chosen_cosines(q[..., :self.cfg.key_dim], keys, best, idx)

    def _attend(self, q_keys: Tensor, win_keys: Tensor, win_bytes: Tensor,
                stored: tuple) -> dict:
        """The read's attention for n queries, the last n positions of a window of w positions.

        Stored entries: `stored`, the top-k of the state (`_stored`: cosines, indices, byte ids, and
        where the exact-context test needs them the near keys' cosines). Local entries: window position j (its context ->
        the byte after it, win_bytes[j+1]) is readable by a query at window position i once j < i.
        The same cosines feed two softmaxes (read channels): the learned-temperature one (a
        smoothed n-gram read) and, with `sharp`, one at that fixed 1/temperature (near-exact
        contexts only). Returns "attn" (C b n k+w-1), each channel's weights (the "nothing matches"
        share is what is missing from 1), the byte ids they carry ("stored_ids" (b n k),
        "local_ids" (b w-1) or None), and the parts for observation (of the learned channel).
        """
        b, n, _ = q_keys.shape
        w = win_keys.shape[1]
        st_cos, st_idx, st_ids, *near = stored  # near: the stored entries' near cosines, where needed
        cos, local_ids = [st_cos], None
        if self.cfg.local and w > 1:
            local = torch.bmm(q_keys, win_keys[:, : w - 1].transpose(1, 2))  # (b n w-1)
            unseen = _unseen(n, w, q_keys.device)
            cos.append(local.masked_fill_(unseen, UNSEEN))  # in place: bmm's backward needs only its inputs
            local_ids = win_bytes[:, 1:]
            if near:
                dk = self.cfg.key_dim
                near.append(torch.bmm(q_keys[..., :dk], win_keys[:, : w - 1, :dk].transpose(1, 2)).masked_fill_(unseen, UNSEEN))
        # every source writes an unseen entry as UNSEEN, not -inf: any scale then puts exactly zero
        # weight on it, and its gradient is exactly zero (a learned scale times -inf has a NaN one)
        cos = torch.cat(cos, dim=-1)
        scales, nulls = [self.log_scale.exp()], [self.null_cos]
        if self.cfg.sharp:
            scales.append(self.log_scale.new_tensor(self.cfg.sharp))
            nulls.append(self.sharp_null)
        attn = _read_softmax(cos, torch.stack(scales), torch.stack(nulls))  # (C b n e)
        k = st_cos.shape[-1]
        return {"attn": attn, "stored_ids": st_ids, "local_ids": local_ids, "k": k, "stored_idx": st_idx,
                "near": torch.cat(near, dim=-1) if near else cos,  # the exact-context test's cosines
                **({"stored_attn": attn[0][..., :k], "local_attn": attn[0][..., k:].sum(-1)} if self.observe else {})}

    def _outs(self) -> list[nn.Linear]:
        """The projections from value_emb to the table, one per table (shared_values: one, or none
        where value_emb is the table itself)."""
        if not self._projected:
            return []
        return [self.out] + ([self.sharp_out] if self.cfg.sharp and not self.cfg.shared_values else [])

    def _bias(self) -> Tensor | None:
        """What a read adds whatever it reads: the projections' biases (with the model's bias)."""
        biases = [t for t in [out.bias for out in self._outs()] + [self.value_bias] if t is not None]
        return sum(biases) if biases else None

    def _table(self) -> Tensor:
        """(257*T d) the value tables (T: 1 with shared_values, else one per read channel): row
        byte*T + t holds the byte's value in table t (projecting the 257 values once is cheaper than
        projecting every position's mix; tables side by side so one embedding bag and one matmul
        mix them all, byte-major so a table is the projection's own output, not a transposed copy).
        Without autograd (generation: one read per byte) it is kept until a weight changes."""
        outs = self._outs()
        if not outs:
            return self.value_emb.weight

        def project() -> Tensor:
            w = torch.cat([out.weight for out in outs]) if len(outs) > 1 else outs[0].weight  # (T*d dv)
            return (self.value_emb.weight @ w.t()).view((PAD + 1) * len(outs), -1)  # (257 T*d) as (257*T d)
        if torch.is_grad_enabled():
            return project()
        # a load or an in-place edit bumps a weight's _version; a fused optimizer step does not, so
        # train() drops the table too (weights change while training, see train())
        key = tuple((w.data_ptr(), w._version) for w in [self.value_emb.weight] + [out.weight for out in outs])
        if self._kept_table is None or self._kept_table[0] != key:
            self._kept_table = (key, project())
        return self._kept_table[1]

    def _mix(self, parts: dict, table: Tensor | None = None) -> Tensor:
        """(b n d) the read before its gate: the attention-weighted values of the bytes the entries
        carry, summed over the read channels. With shared_values the channels' weights are added
        first (one table), else channel c's weight for byte id addresses row id*C + c of the table.
        The k stored entries are one weighted embedding bag, the local ones one matmul."""
        attn, k, ids = parts["attn"], parts["k"], parts["stored_ids"]
        if self.cfg.shared_values and attn.shape[0] > 1:
            attn = attn.sum(0, keepdim=True)  # one table: every channel's weight on an entry reads the same value
        C, b, n, e = attn.shape
        table = self._table() if table is None else table
        chan = torch.arange(C, device=ids.device)[:, None] if C > 1 else None  # a channel's row among its byte's C

        def rows(i: Tensor) -> Tensor:  # (... m) byte ids -> (... C m) table rows (one table: the ids)
            return i.unsqueeze(-2) if chan is None else C * i.unsqueeze(-2) + chan

        stored, local = attn.split([k, e - k], dim=-1)  # one backward node for both parts
        if k == 0:  # nothing stored yet
            read = attn.new_zeros(b, n, table.shape[1])
        elif k <= GATHER_K:  # a few entries per query: their values' weighted sum, in one fused kernel
            bag = rows(ids).reshape(b * n, C * k)  # (b n C k) -> bags of C*k
            weights = stored.permute(1, 2, 0, 3).reshape(b * n, C * k)
            read = F.embedding_bag(bag, table, mode="sum", per_sample_weights=weights).view(b, n, -1)
        else:  # many (a dense read): sum the attention per (channel, byte id) first, then one matmul
            per_row = [attn.new_zeros(b, n, PAD + 1).scatter_add_(2, ids, a) for a in stored]  # no (b n C k) copy
            read = torch.stack(per_row, dim=-1).flatten(2) @ table  # (b n 257 C) -> rows id*C + c
        if parts["local_ids"] is not None:
            w1 = e - k
            lids = rows(parts["local_ids"]).reshape(b, C * w1)  # (b C*(w-1))
            # one table: the (b n w-1) weights as they lie (bmm reads the strided rows), else channels side by side
            weights = local[0] if C == 1 else local.permute(1, 2, 0, 3).reshape(b, n, C * w1)
            read = read + torch.bmm(weights, _rows(table, lids))
        bias = self._bias()
        return read if bias is None else read + bias

    def _gated(self, h: Tensor, read: Tensor, parts: dict) -> Tensor:
        """The gated read; when it `copies`, also leaves `copied`: the sharp read's mass per next byte
        (the last channel's), times lambda (kNN-LM, Khandelwal et al. 2020: p = (1 - lambda) p_model
        + lambda p_memory, here with lambda times the read's own confidence, so "nothing matches"
        leaves the model's distribution as it is). lambda: the learned copy weight with `copy`, else
        the fixed `knn_lm`, raised to `knn_exact` for entries whose context is exactly the query's
        (Drozdov et al. 2022 weigh a retrieval by how well its context matches: an exact 16-byte context
        is followed by its stored byte far more often than a near one)."""
        if self.copies:
            sharp = parts["attn"][-1]
            if self.cfg.copy:
                self.copied = torch.sigmoid(self.copy_gate(h)) * self._per_byte(parts, sharp)[..., :PAD]
            else:  # an entry whose context is exactly the query's votes with knn_exact, any other with knn_lm
                lam, exact = self.cfg.knn_lm, self.cfg.knn_exact
                if exact > lam:
                    self.copied = self._per_byte(parts, sharp * torch.where(parts["near"] >= EXACT_COS, exact, lam))[..., :PAD]
                else:
                    self.copied = lam * self._per_byte(parts, sharp)[..., :PAD]
        gate = torch.sigmoid(self.gate(h))
        if self.observe:
            slot = self.slot_of_entries(h.device)[parts["stored_idx"]]  # (b n k)
            per_slot = torch.zeros(*slot.shape[:2], self.cfg.slots, device=h.device)
            per_slot.scatter_add_(2, slot, parts["stored_attn"])
            self._record(read_attn=per_slot, local_attn=parts["local_attn"], gate=gate.squeeze(-1))
        return gate * read

    def lookup(self, seg: Segment, state: State) -> tuple[Tensor, dict]:
        """For analysis: (b n C 257) the attention mass each read channel (0: learned temperature,
        1: sharp) puts on each byte id after each position of one segment, and the parts."""
        parts = self._segment_parts(seg, state)
        return torch.stack([self._per_byte(parts, a) for a in parts["attn"]], dim=2), parts

    @staticmethod
    def _per_byte(parts: dict, attn: Tensor) -> Tensor:
        """(b n 257) one channel's attention (b n e) summed per byte id its entries carry."""
        ids = parts["stored_ids"]
        b, n, _ = ids.shape
        if parts["local_ids"] is not None:
            ids = torch.cat([ids, parts["local_ids"][:, None].expand(b, n, -1)], dim=-1)
        return attn.new_zeros(b, n, PAD + 1).scatter_add(2, ids, attn)

    def _segment_parts(self, seg: Segment, state: State) -> dict:
        """`_attend` for every position of one segment, its window being the segment itself."""
        kw = self._ngram(seg.ids, seg.prev)
        return self._attend(kw, kw, seg.ids, self._stored(kw, state))

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        parts = self._segment_parts(seg, state)
        return self._gated(h, self._mix(parts), parts)

    def new_cache(self, batch: int) -> EpisodicCache:
        return EpisodicCache()

    def read_step(self, h: Tensor, seg: Segment, state: State, cache: EpisodicCache | None) -> Tensor:
        """Decoding: the new positions' keys are appended to the window's cached keys (one n-gram per byte)."""
        if cache is None:
            return self.read(h, seg, state)
        new = self._ngram(seg.ids, seg.prev)
        cache.keys = new if cache.keys is None else torch.cat([cache.keys, new], dim=1)
        cache.bytes = seg.ids if cache.bytes is None else torch.cat([cache.bytes, seg.ids], dim=1)
        parts = self._attend(new, cache.keys, cache.bytes, self._stored(new, state))
        return self._gated(h, self._mix(parts), parts)

    # --- a whole episode at once (training) ----------------------------------------------------
    def episode_reader(self, segments: int, n: int) -> bool:
        """With every position offered and nothing evicted, what a segment reads is fixed by the bytes.

        Then the state before segment s holds exactly the entries of segments 0..s-1 (key: the n-gram
        at each position, value: its target, valid where known); surprise only decides retention,
        which never acts while the episode fits the budget. Conditions: every position offered
        (entries >= n), no eviction ((segments - 1) * n <= size), keys reach back no further than the
        previous segment (key_bytes (+ far_bytes with far_on) - 1 <= n), and neither frozen nor observed.
        """
        return (not self.frozen and not self.observe and self.per_write >= n
                and (segments - 1) * n <= self.size and self._context_bytes() - 1 <= n)

    def _context_bytes(self) -> int:
        """How many bytes a key reads (its own, and with far_on the far ones)."""
        return self.cfg.key_bytes + (self.cfg.far_bytes if self.far_on else 0)

    def read_episode(self, h: Tensor, stream: Segment, starts: list[int], n: int) -> Tensor:
        """`read` of the n-byte segments beginning at `starts` of whole fresh episodes (b L).

        A segment's stored entries are the known positions before it (-> their targets), its local
        entries its own earlier positions (-> the next byte): the same scores, top-k and softmax as
        the sequential path (only float rounding differs). Each segment is scored against the prefix
        it can see alone; positions between read segments (a gap) are stored entries like any other.
        The k entries are chosen segment by segment without autograd; everything after (cosines
        with gradient, softmaxes, values) runs once for all segments, so a step pays the autograd
        and per-operation cost of one read however many segments it scores.
        """
        ids, targets = stream.ids, stream.targets
        b, L = ids.shape
        S, k = len(starts), min(self.cfg.topk, max(starts)) if self.cfg.topk else max(starts)
        # gap text: its keys are candidates, of which each query reads a few; then the keys are
        # computed without autograd, and again with it only for the rows read (every query's, every
        # chosen entry's), which spares a dense (b L dk) gradient (zero-filled, summed, scanned)
        few = k > 0 and bool(self.cfg.topk) and L > S * n and torch.is_grad_enabled() and self.key_emb.requires_grad
        if few:
            key_rows = self._ngram_rows(ids, stream.prev)
            with torch.no_grad():
                kw = self._keys(key_rows).view(b, L, -1)
        else:
            kw = self._ngram(ids, stream.prev)  # (b L dk): every position's context within its episode
        no_next = targets < 0  # (b L) positions whose next byte is unknown: never stored
        bytes_ = targets.masked_fill(no_next, PAD)
        pos = _positions(tuple(starts), n, ids.device)  # (S*n) the read segments' stream positions
        whole = S * n == L  # every segment read (no gap): the positions are the stream itself
        q = kw if whole else kw.index_select(1, pos)  # (b S*n dk)
        if self.cfg.topk == 0 or k == 0:  # dense (or nothing stored before any segment): segment by segment
            table, hs, reads, copied = self._table(), h.view(b, S, n, -1), [], []
            for s, lo in enumerate(starts):
                win = q[:, s * n:(s + 1) * n]
                prefix = {"keys": kw[:, :lo], "bytes": bytes_[:, :lo], "score": kw.new_zeros(b, lo).masked_fill(no_next[:, :lo], -math.inf)}
                parts = self._attend(win, win, ids[:, lo:lo + n], self._stored(win, prefix))
                reads.append(self._gated(hs[:, s], self._mix(parts, table), parts))
                copied.append(self.copied)
            if self.copies:
                self.copied = torch.stack(copied, dim=1).flatten(0, 1)
            return torch.stack(reads, dim=1).flatten(0, 1)  # episode-major, as h
        with torch.no_grad():  # which k entries, each segment against its own prefix
            unknown = self._let_go(no_next)  # (b L) never stored, or hidden in training
            # two calls: the segments before the last together (prefixes end at the last but one's
            # start), the last alone (after a gap its prefix is long): at most twice the scores needed;
            # a segment at the episode's start has no prefix: nothing to score (-inf, index 0)
            lead = int(starts[0] == 0)
            best = [_prefix_topk(q[:, :lead * n], kw, unknown, [], n, k),
                    _prefix_topk(q[:, lead * n:(S - 1) * n], kw, unknown, starts[lead:-1], n, k),
                    _prefix_topk(q[:, (S - 1) * n:], kw, unknown, starts[-1:], n, k)]
            s, i = torch.cat([c for c, _ in best], 1), torch.cat([j for _, j in best], 1)  # (b S*n k)
            if few:  # the rows read, and each stream position's place among them
                mark = torch.zeros(b, L, dtype=torch.bool, device=ids.device)
                rows = mark.index_fill_(1, pos, True).scatter_(1, i.flatten(1), True).flatten().nonzero().squeeze(1)  # (R) of b*L
                place = torch.full((b * L,), -1, dtype=torch.long, device=ids.device)
                place.index_copy_(0, rows, torch.arange(rows.numel(), device=ids.device))
        if few:
            keys = self._keys(key_rows.index_select(0, rows))  # (R dk), with autograd
            offset = L * torch.arange(b, device=ids.device)
            q = _rows(keys, place[pos + offset[:, None]])  # (b S*n dk)
            cos = _cosines_at(q, keys, place[i + offset[:, None, None]], s)
        else:
            cos = _chosen_cosines(q, kw, s, i)
        st_ids = bytes_.gather(1, i.flatten(1)).view_as(i)
        per_seg = lambda t: t.reshape(b * S, n, *t.shape[2:])  # noqa: E731  (b S*n ...) -> (b*S n ...)
        win_bytes = ids if whole else ids.index_select(1, pos)
        stored = (per_seg(cos), per_seg(i), per_seg(st_ids))
        if self._near_needed():
            stored += (per_seg(self._near_at(q, kw, i, s)),)
        parts = self._attend(per_seg(q), per_seg(q), per_seg(win_bytes), stored)
        if self.cfg.keep and torch.is_grad_enabled():
            self.aux_loss = self._keep_loss(h, parts["attn"][-1][..., :k].reshape(b, S * n, k), i, pos[:(S - 1) * n], targets)
        return self._gated(h, self._mix(parts), parts)  # episode-major, as h

    def _keep_loss(self, h: Tensor, attn: Tensor, idx: Tensor, pos: Tensor, targets: Tensor) -> Tensor:
        """The keep head's loss: for each position `pos` of a scored segment before the last, how much
        sharp-read attention (b S*n k over stream positions idx) later segments paid its entry,
        capped at 1, as the target of a logistic score of its (detached) hidden state. Retention
        never acts in training (nothing is evicted), so this teaches which entries are worth
        keeping without changing anything else the model learns. (Top-k reads only: a dense read
        trains no keep head.)"""
        b, L = targets.shape
        mass = attn.new_zeros(b, L).scatter_add_(1, idx.flatten(1), attn.detach().flatten(1))  # (b L)
        target = mass.index_select(1, pos).clamp(max=1.0)  # (b P)
        known = (targets.index_select(1, pos) >= 0).float()  # an unknown next byte is never stored
        # h is episode-major (b*S n d): each episode's first P positions are those segments
        logit = self.keep_head(h.detach().view(b, -1, h.shape[-1])[:, :len(pos)]).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logit, target, weight=known, reduction="sum")
        return loss / known.sum().clamp(min=1)

    # --- writing -------------------------------------------------------------------------------
    def retention_score(self, surprise: Tensor, before: Tensor | None = None) -> Tensor:
        """(b n) per-byte loss -> (b n) retention score (see the module docstring). `before` (b w-1)
        is the loss of the bytes written just before this segment (-inf: none, at an episode's start),
        so a span crosses segment boundaries as the text does; bytes not yet written are left out of
        a mean, never stood in for by a repeated edge byte."""
        w = self.cfg.span
        if w <= 1:
            return surprise
        half = w // 2
        x = surprise if before is None else torch.cat([before, surprise], 1)
        mean = _span_mean(x, half, half)
        if self.cfg.trail:  # the run leading up to a byte counts too: a fact's tail is followed by easy text
            mean = torch.maximum(mean, _span_mean(x, w - 1, 0))
        return torch.where(surprise > SURE, mean[:, x.shape[1] - surprise.shape[1]:], surprise)

    def _let_go(self, never: Tensor) -> Tensor:
        """`never` (positions never stored: next byte unknown), and in training with `drop` also
        positions hidden at random: training episodes never fill the budget, so this stands in for
        the entries retention lets go (both the whole-episode read and the segment loop's writes)."""
        if self.cfg.drop and self.training:
            return never | (torch.rand(never.shape, device=never.device) < self.cfg.drop)
        return never

    def write_over(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        """In place where nothing needs the old state: copying a 16,384-entry key buffer at every
        write was a tenth of `imm needle`'s time."""
        if self.frozen or torch.is_grad_enabled():
            return self.write(h, seg, state, surprise)
        return self._write(h, seg, state, surprise, in_place=True)

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor, in_place: bool = False) -> State:
        b, n = seg.ids.shape
        M, dk = self.size, state["keys"].shape[-1]  # the state's key width (a state made in the other mode keeps its own)
        surprise = surprise.float().masked_fill(seg.targets < 0, -math.inf)  # no next byte: no loss to count
        score = self.retention_score(surprise, state["before"])
        if self.cfg.keep:
            score = score + self.cfg.keep * torch.sigmoid(self.keep_head(h)).squeeze(-1)
        score = score.masked_fill(self._let_go(seg.targets < 0), -math.inf)
        k = min(self.per_write, n, M)
        new_score, pos = score.topk(k, dim=1)  # (b k) offered entries, most surprising first
        new_keys = _fit(self.context_keys(seg), dk).gather(1, pos[..., None].expand(-1, -1, dk))
        new_bytes = seg.targets.gather(1, pos)
        old_score = state["score"] * self.cfg.decay  # -inf (empty) stays -inf
        # (b k) the weakest stored, weakest first; empty ones before all, lowest index first, so the
        # stored entries always fill the buffer from index 0 and a read can stop at the last one
        order = torch.arange(M, device=old_score.device) - M
        rank = torch.where(torch.isfinite(old_score), old_score, order * 1e30)
        slot = rank.topk(k, dim=1, largest=False).indices
        low_score = old_score.gather(1, slot)
        # the i-th strongest offer replaces the i-th weakest stored entry while it scores higher:
        # afterwards the memory holds the `size` best of old and offered entries, positions stable
        take = new_score > low_score
        e = slot[..., None].expand(-1, -1, dk)
        put = torch.Tensor.scatter_ if in_place else torch.Tensor.scatter
        keys = put(state["keys"], 1, e, torch.where(take[..., None], new_keys, state["keys"].gather(1, e)))
        nxt = put(state["bytes"], 1, slot, torch.where(take, new_bytes, state["bytes"].gather(1, slot)))
        kept = old_score.scatter_(1, slot, torch.where(take, new_score, low_score))  # old_score is a new tensor
        born = put(state["born"], 1, slot, torch.where(take, state["writes"][:, None], state["born"].gather(1, slot)))
        if self.observe:
            per_slot = torch.zeros(b, self.cfg.slots, device=take.device)
            per_slot.scatter_add_(1, self.slot_of_entries(take.device)[slot], take.float())
            self._record(write_slot=per_slot / per_slot.sum(1, keepdim=True).clamp(min=1),
                         written=take.float().sum(1))
        seen = torch.cat([state["before"], surprise], 1)
        before = seen[:, seen.shape[1] - state["before"].shape[1]:]
        return {"keys": keys, "bytes": nxt, "score": kept, "born": born, "writes": state["writes"] + 1, "before": before}

    def slot_vectors(self, state: State) -> Tensor:
        """Mean stored value of each slot's entries, mapped like a read (zeros for an empty slot)."""
        valid = torch.isfinite(state["score"]).float()[..., None]  # (b M 1)
        table = self._table().view(PAD + 1, -1, self.n_embd)[:, 0]  # (257 d) the (first) read channel's values
        values = F.embedding(state["bytes"], table) * valid
        b = values.shape[0]
        slot = self.slot_of_entries(values.device)
        total = torch.zeros(b, self.cfg.slots, values.shape[-1], device=values.device).index_add_(1, slot, values)
        count = torch.zeros(b, self.cfg.slots, 1, device=values.device).index_add_(1, slot, valid)
        bias = self._bias()
        mean = total / count.clamp(min=1)
        return mean if bias is None else mean + bias


def _per_shape(fn):
    """Cache a mask or index tensor per shape: every read of a shape asks for the same one. Under
    torch.compile the tensor is made in the graph instead (dynamo traces through a cache anyway)."""
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def get(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)
    return get


@_per_shape
def _unseen(n: int, w: int, device: torch.device) -> Tensor:
    """(n w-1) for the last n positions of a w-position window, the window entries j (context j ->
    byte j+1) each may not read yet: those with j >= its own position. Cached, as every read of a
    shape asks (made outside inference mode, so training may save it for backward)."""
    with torch.inference_mode(False):
        return ~torch.ones(n, w - 1, dtype=torch.bool, device=device).tril(w - n - 1)


@_per_shape
def _positions(starts: tuple[int, ...], n: int, device: torch.device) -> Tensor:
    """(S*n) the stream positions of the n-byte segments beginning at `starts` (cached per episode
    shape, outside inference mode as _unseen)."""
    with torch.inference_mode(False):
        return (torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device)).flatten()


@_per_shape
def _not_yet(starts: tuple[int, ...], n: int, device: torch.device) -> Tensor:
    """(S*n max(starts)) for each query of the n-byte segments beginning at `starts`, the stream
    positions not yet written when its segment is read (cached, outside inference mode as _unseen)."""
    with torch.inference_mode(False):
        first = torch.tensor(starts, device=device).repeat_interleave(n)  # (S*n) each query's segment start
        return torch.arange(max(starts), device=device)[None] >= first[:, None]


def _span_mean(x: Tensor, left: int, right: int) -> Tensor:
    """(b L) -> (b L) the mean of x over each position and `left` / `right` positions around it,
    over the positions that exist and are finite (-inf: no byte)."""
    known = torch.isfinite(x)
    pad = lambda v: F.pad(v[:, None], (left, right))  # noqa: E731
    total = F.avg_pool1d(pad(torch.where(known, x, 0.0)), left + right + 1, stride=1)[:, 0]
    count = F.avg_pool1d(pad(known.to(x.dtype)), left + right + 1, stride=1)[:, 0]
    return total / count.clamp(min=1e-9)


def _fit(keys: Tensor, width: int) -> Tensor:
    """keys (... D) cut or zero-padded to `width`: near and far keys stay aligned (a missing far key
    adds nothing to a dot product), so a state written with the far key off is read with it on."""
    if keys.shape[-1] >= width:
        return keys[..., :width]
    return F.pad(keys, (0, width - keys.shape[-1]))


def _stored_end(valid: Tensor) -> int:
    """1 + the index of the last stored entry over all rows of a (b M) validity mask (0 if none)."""
    return int((valid * torch.arange(1, valid.shape[1] + 1, device=valid.device)).amax()) if valid.numel() else 0


def _chosen_cosines(q: Tensor, keys: Tensor, best: Tensor, idx: Tensor) -> Tensor:
    """(b n k) the cosines of queries q (b n dk) with the keys (b M D) at idx (b n k), with autograd
    (UNSEEN where the selection found nothing: `best` is -inf); keys wider than q (D > dk: with the far
    key) are read in their first dk dimensions, the near key."""
    b, M, _ = keys.shape
    flat = keys.flatten(0, 1)
    if flat.shape[-1] > q.shape[-1]:  # sliced only when narrower: no extra autograd node in training
        flat = flat[:, :q.shape[-1]]
    return _cosines_at(q, flat, idx + M * torch.arange(b, device=idx.device)[:, None, None], best)


def _cosines_at(q: Tensor, keys: Tensor, rows: Tensor, best: Tensor) -> Tensor:
    """(b n k) the cosines of queries q (b n dk) with the rows (b n k) of a flat key table keys (R dk)."""
    chosen = _rows(keys, rows)  # (b n k dk)
    # broadcast multiply and sum, not einsum: einsum's backward is a batched matmul of tiny (dk x 1)
    # by (1 x k) outer products (the whole read measured about 6% faster this way)
    return (q[:, :, None] * chosen).sum(-1).masked_fill(torch.isneginf(best), UNSEEN)


def _prefix_topk(q: Tensor, keys: Tensor, unknown: Tensor, starts: list[int], n: int, k: int) -> tuple[Tensor, Tensor]:
    """(b S*n k) cosines and indices of the k best keys (b L dk) for the queries q (b S*n dk) of the
    n-byte segments beginning at `starts`, each query seeing only the keys before its segment's start
    whose next byte is known; -inf (index 0) where fewer than k exist."""
    if not starts:  # nothing stored before these queries (or no queries)
        b, m = q.shape[:2]
        return q.new_full((b, m, k), -math.inf), torch.zeros(b, m, k, dtype=torch.long, device=q.device)
    end = max(starts)
    scores = torch.bmm(q, keys[:, :end].transpose(1, 2))  # (b S*n end)
    # masks only where something is masked: after a gap the last segment's (b n end) scores are the
    # step's largest matrix, one start hides nothing of its prefix, and training hides no position
    if len(starts) > 1:
        scores.masked_fill_(_not_yet(tuple(starts), n, q.device)[None], -math.inf)
    if bool(unknown[:, :end].any()):
        scores.masked_fill_(unknown[:, None, :end], -math.inf)
    return _topk_padded(scores, k)


def _topk_padded(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores.topk(k) over the last dim, padded with -inf (index 0) where fewer than k scores exist."""
    have = min(k, scores.shape[-1])
    s, i = _topk(scores, have) if have else (scores[..., :0], scores[..., :0].long())
    if have == k:
        return s, i
    pad = (*s.shape[:-1], k - have)
    return torch.cat([s, s.new_full(pad, -math.inf)], -1), torch.cat([i, i.new_zeros(pad)], -1)


def _topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores.topk(k) over the last dim (n scores, n >= k). On CPU, torch selects by heap only where
    64 k <= n and otherwise by nth_element, measured 2 to 5x slower at k = 4 (n 64 to 255: a read
    of the first segments, torch 2.13, 2 cores); so a short row of a small k is padded with -inf to
    64 k first. A pad is only ever taken where the row has fewer than k finite scores: its index is
    then moved into range, and its -inf score marks it unseen as before."""
    n = scores.shape[-1]
    if not (k <= HEAP_K and k <= n < 64 * k and scores.device.type == "cpu"):
        return scores.topk(k, dim=-1)
    s, i = F.pad(scores, (0, 64 * k - n), value=-math.inf).topk(k, dim=-1)
    return s, i.clamp_(max=n - 1)


def _rows(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx] as index_select, whose backward is one index_add_ (indexing's is a slower index_put_)."""
    return table.index_select(0, idx.flatten()).view(*idx.shape, table.shape[-1])


def _read_softmax(cos: Tensor, scales: Tensor, nulls: Tensor) -> Tensor:
    """(b n e) cosines -> (C b n e): per read channel c (1/temperature scales[c], "nothing matches"
    cosine nulls[c]), the attention over the e entries (not the unseen ones) beside "nothing
    matches" (its share dropped)."""
    C = scales.shape[0]
    logits = scales[:, None, None, None] * cos  # (C b n e); an unseen entry's UNSEEN underflows to weight 0
    null = (scales * nulls)[:, None, None, None].expand(C, *cos.shape[:2], 1)
    return torch.softmax(torch.cat([logits, null], dim=-1), dim=-1)[..., :-1]


def _unit_keys(table: Tensor, idx: Tensor) -> Tensor:
    """(R dk) the unit n-gram keys of the rows idx (R K) of the flat key table, without autograd's
    bookkeeping (generation, and choosing entries); _NGramKey is the same with a lean backward."""
    return F.normalize(F.embedding_bag(idx, table, mode="sum"), dim=-1)


class _NGramKey(torch.autograd.Function):
    """F.normalize(F.embedding_bag(idx, table, mode="sum")): unit n-gram keys, with a lean backward.

    The built-in embedding-bag backward sorts the (b*n*K) indices first; with every row of the small
    key table touched anyway, scattering the gradient rows straight into a dense table is several
    times faster. The normalisation's backward is fused in (one node instead of norm, clamp, div).
    """

    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor) -> Tensor:
        emb = F.embedding_bag(idx, table, mode="sum")
        norm = emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
        unit = emb / norm
        ctx.save_for_backward(idx, unit, norm)
        ctx.rows = table.shape[0]
        return unit

    @staticmethod
    def backward(ctx, grad: Tensor):
        idx, unit, norm = ctx.saved_tensors
        grad = (grad - unit * (grad * unit).sum(-1, keepdim=True)) / norm  # through x / |x|
        # one index_add_ over every (offset, position), offset-major so consecutive adds land in one
        # offset's 257-row block: measured 2x faster than one call per offset (whose fixed cost
        # dominates at a few hundred rows) and than position-major order (torch 2.13, 2 cores)
        K = idx.shape[1]
        out = grad.new_zeros(ctx.rows, grad.shape[1]).index_add_(0, idx.t().reshape(-1), grad.repeat(K, 1))
        return out, None
