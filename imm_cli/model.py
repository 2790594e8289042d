"""A byte-level GPT in the nanoGPT mould, with an optional memory in one block.

Pre-LayerNorm blocks, causal attention through `scaled_dot_product_attention`, tied input/output
embeddings, learned absolute positions. With `memory.slots == 0` this is exactly the baseline GPT;
otherwise one block reads its memory between attention and MLP, and after the segment's logits are
known the memory is written (episodic memory uses the per-byte loss as its surprise signal).
The memory state is per sequence and is returned, so callers carry it from segment to segment.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from imm_cli.config import ModelConfig
from imm_cli.memory import Memory, Segment, State, build_memory


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental generation."""

    k: Tensor | None = None  # (b h t hd)
    v: Tensor | None = None


@dataclass
class GPTOutput:
    logits: Tensor  # (b n vocab)
    loss: Tensor | None  # mean cross-entropy over known targets
    token_loss: Tensor | None  # (b n) per-byte loss, 0 where the target is unknown
    state: State | None  # the memory state after this segment (written unless frozen)
    caches: list[KVCache] = field(default_factory=list)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        q, k, v = rearrange(self.c_attn(x), "b n (three h d) -> three b h n d", three=3, h=self.n_head)
        causal, mask = True, None
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
                causal = False  # new queries see everything cached, and each other causally
                n, t = q.shape[2], k.shape[2]
                if n > 1:
                    mask = torch.ones(n, t, dtype=torch.bool, device=q.device).tril(t - n)
            cache.k, cache.v = k, v
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        return self.c_proj(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, memory: Memory | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.memory = memory
        self.ln_m = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if memory is not None else None

    def forward(self, x: Tensor, seg: Segment, state: State | None, cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), cache)
        h = None
        if self.memory is not None:
            h = self.ln_m(x)  # what the memory reads with and later writes from
            if not self.memory.ablated:
                x = x + (self.memory.read_episode(h, seg) if seg.episode else self.memory.read(h, seg, state))
        x = x + self.mlp(self.ln_2(x))
        return x, h


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.check()
        mem_layer = cfg.memory_layer
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, build_memory(cfg.memory, cfg.n_embd, cfg.bias, cfg.block_size) if i == mem_layer else None)
            for i in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.memory is not None:
            self.memory.post_init()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # --- memory helpers ------------------------------------------------------------------------
    @property
    def memory(self) -> Memory | None:
        layer = self.cfg.memory_layer
        return None if layer is None else self.blocks[layer].memory

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State | None:
        if self.memory is None:
            return None
        return self.memory.init_state(batch, device or self.wte.weight.device)

    @contextmanager
    def memory_mode(self, frozen: bool | None = None, ablated: bool | None = None, observe: bool | None = None):
        """Temporarily freeze (no writes), ablate (no reads) or observe (record attention) the memory."""
        mem = self.memory
        if mem is None:
            yield None
            return
        saved = (mem.frozen, mem.ablated, mem.observe)
        mem.frozen = saved[0] if frozen is None else frozen
        mem.ablated = saved[1] if ablated is None else ablated
        mem.observe = saved[2] if observe is None else observe
        try:
            yield mem
        finally:
            mem.frozen, mem.ablated, mem.observe = saved

    def num_params(self) -> tuple[int, int]:
        """(all parameters, memory parameters); tied embeddings counted once."""
        total = sum(p.numel() for p in self.parameters())
        mem_layer = self.cfg.memory_layer
        mem = 0
        if mem_layer is not None:
            block = self.blocks[mem_layer]
            mem = sum(p.numel() for p in block.memory.parameters()) + sum(p.numel() for p in block.ln_m.parameters())
        return total, mem

    def episode_at_once(self, segments: int, n: int) -> bool:
        """Whether `forward` may take a fresh episode (b segments n) in one batched call (see _forward_episode)."""
        mem = self.memory
        return mem is None or (mem.ablated and not mem.observe) or mem.episode_at_once(segments, n)

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        state: State | None = None,
        prev: Tensor | None = None,
        caches: list[KVCache] | None = None,
        pos_offset: int = 0,
        write: bool = True,
        window: Tensor | None = None,
    ) -> GPTOutput:
        """idx (b n) bytes; targets (b n) next bytes, -1 = unknown; prev (b p) bytes before idx.

        idx and targets of shape (b segments n) are whole fresh episodes, run at once (only where
        `episode_at_once` holds): loss is the mean over segments of each segment's mean loss, as the
        segment-by-segment loop gives; no state is returned.
        """
        if idx.dim() == 3:
            return self._forward_episode(idx, targets)
        b, n = idx.shape
        if pos_offset + n > self.cfg.block_size:
            raise ValueError(f"sequence of {pos_offset + n} bytes exceeds block size {self.cfg.block_size}")
        if prev is None:
            prev = idx.new_zeros((b, 0))
        if state is None and self.memory is not None:
            state = self.init_state(b, idx.device)
        write_targets = targets
        if write_targets is None:  # positions whose next byte is in idx are still worth writing
            write_targets = torch.cat([idx[:, 1:], idx.new_full((b, 1), -1)], dim=1)
        seg = Segment(ids=idx, prev=prev, targets=write_targets)
        if window is not None:  # incremental step: the memory may look back over the whole window
            seg.window, seg.window_prev = window, prev[:, : prev.shape[1] - (window.shape[1] - n)]

        pos = torch.arange(pos_offset, pos_offset + n, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        h_mem = None
        for i, block in enumerate(self.blocks):
            x, h = block(x, seg, state, None if caches is None else caches[i])
            if h is not None:
                h_mem = h
        logits = self.lm_head(self.ln_f(x))
        if self.memory is not None and self.memory.observe:
            self.memory._record(hidden=h_mem)  # the memory layer's (normalised) hidden states, b n d

        token_loss = loss = None
        want_write = write and caches is None and self.memory is not None and not self.memory.frozen
        if targets is not None or want_write:
            flat = F.cross_entropy(
                rearrange(logits, "b n v -> (b n) v").float(),
                rearrange(write_targets, "b n -> (b n)").clamp(min=0),
                reduction="none",
            )
            known = write_targets >= 0
            token_loss = rearrange(flat, "(b n) -> b n", b=b) * known
            if targets is not None:
                loss = token_loss.sum() / (targets >= 0).sum().clamp(min=1)
        if want_write:
            state = self.memory.write(h_mem, seg, state, token_loss.detach().masked_fill(write_targets < 0, 0.0))
        return GPTOutput(logits=logits, loss=loss, token_loss=token_loss, state=state, caches=caches or [])

    def _forward_episode(self, idx: Tensor, targets: Tensor) -> GPTOutput:
        """Every segment of fresh episodes in one batched forward: the memory reads what the
        sequential loop would have written (EpisodicMemory.read_episode), nothing waits for a write."""
        b, S, n = idx.shape
        if targets is None or targets.shape != idx.shape:
            raise ValueError("a whole-episode forward needs targets of the same (b segments n) shape")
        if n > self.cfg.block_size:
            raise ValueError(f"sequence of {n} bytes exceeds block size {self.cfg.block_size}")
        if not self.episode_at_once(S, n):
            raise ValueError("this memory cannot run an episode at once; run its segments one by one")
        ids, tg = idx.reshape(b * S, n), targets.reshape(b * S, n)
        seg = Segment(ids=ids, prev=ids.new_zeros((b * S, 0)), targets=tg, episode=S)
        x = self.drop(self.wte(ids) + self.wpe(torch.arange(n, device=idx.device)))
        for block in self.blocks:
            x, _ = block(x, seg, None)
        logits = self.lm_head(self.ln_f(x))
        flat = F.cross_entropy(rearrange(logits, "b n v -> (b n) v").float(), tg.reshape(-1).clamp(min=0), reduction="none")
        known = tg >= 0
        token_loss = flat.view(b, S, n) * known.view(b, S, n)
        per_segment = token_loss.sum(dim=(0, 2)) / known.view(b, S, n).sum(dim=(0, 2)).clamp(min=1)
        return GPTOutput(logits=logits.view(b, S, n, -1), loss=per_segment.mean(), token_loss=token_loss, state=None)

    # --- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        idx: Tensor,
        max_new: int,
        state: State | None = None,
        prev: Tensor | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Greedy bytes after idx (b n) -> (b max_new). Reads the memory, never writes it.

        With the cache each new byte costs one position of compute. Past the block size the window
        is re-primed on its last half (the uncached path crops every step instead), so the two paths
        agree exactly while prompt + generated bytes fit in one block.
        """
        B = self.cfg.block_size
        stream = idx if prev is None else torch.cat([prev, idx], dim=1)  # every byte seen so far
        start = max(stream.shape[1] - idx.shape[1], stream.shape[1] - B)  # where the window begins
        out: list[Tensor] = []
        caches: list[KVCache] | None = None
        logits = None
        for step in range(max_new):
            if logits is None:  # (re)compute the whole window
                caches = [KVCache() for _ in self.blocks] if use_cache else None
                logits = self(stream[:, start:], state=state, prev=stream[:, :start], caches=caches, write=False).logits[:, -1]
            nxt = logits.argmax(dim=-1, keepdim=True)
            out.append(nxt)
            stream = torch.cat([stream, nxt], dim=1)
            logits = None
            if step == max_new - 1:
                break
            if not use_cache:
                start = max(start, stream.shape[1] - B)
            elif stream.shape[1] - start > B:
                start = stream.shape[1] - B // 2
            else:
                pos = stream.shape[1] - 1 - start
                logits = self(nxt, state=state, prev=stream[:, :-1], caches=caches, pos_offset=pos, write=False,
                              window=stream[:, start:]).logits[:, -1]
        return torch.cat(out, dim=1) if out else idx.new_zeros((idx.shape[0], 0))
