"""nanoGPT's CPU training step, restated so bench.py can time it beside `imm train --slots 0`.

The issue's reference is nanoGPT's shakespeare_char run on a CPU (`--device=cpu --compile=False
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0`). This file
re-states what that run does per iteration, written for this benchmark, not copied:
- characters, not bytes: a 65-symbol vocabulary built from the training text;
- batches drawn with torch.randint and sliced from a uint16 np.memmap re-opened every step;
- the model: pre-LayerNorm blocks without biases, causal scaled_dot_product_attention, GELU MLP,
  tied embeddings, logits for every position and cross-entropy with ignore_index=-1;
- AdamW with weight decay 0.1 on matrices, betas (0.9, 0.99), fused only on CUDA (so on a CPU
  the default per-parameter implementation), gradient clipping at 1.0, warmup + cosine schedule,
  and loss.item() every iteration (log_interval=1).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPTLike(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, heads: int, d: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class NanoGPTTrainer:
    """One nanoGPT-style training iteration per `step()`, on a char-encoded copy of the text in `workdir`."""

    def __init__(self, text: str, workdir: Path, block: int = 64, batch: int = 12, layers: int = 4,
                 heads: int = 4, d: int = 128, lr: float = 1e-3, iters: int = 2000, seed: int = 1337) -> None:
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = np.array([stoi[c] for c in text[: int(0.9 * len(text))]], dtype=np.uint16)
        self.path = Path(workdir) / "train.bin"
        ids.tofile(self.path)
        self.block, self.batch, self.lr, self.iters = block, batch, lr, iters
        torch.manual_seed(seed)
        self.model = NanoGPTLike(len(chars), block, layers, heads, d).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.99))  # nanoGPT: fused=False off CUDA, torch's default otherwise
        self.step_no = 0
        self.x, self.y = self._batch()

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.path, dtype=np.uint16, mode="r")  # nanoGPT re-opens it each batch
        ix = torch.randint(len(data) - self.block, (self.batch,))
        x = torch.stack([torch.from_numpy(data[i: i + self.block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1: i + 1 + self.block].astype(np.int64)) for i in ix])
        return x, y

    def _lr(self) -> float:
        warmup, it = 100, self.step_no
        if it < warmup:
            return self.lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / max(1, self.iters - warmup))
        return self.lr / 10 + 0.5 * (1 + math.cos(math.pi * ratio)) * (self.lr - self.lr / 10)

    def step(self) -> float:
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        loss = self.model(self.x, self.y)
        self.x, self.y = self._batch()  # prefetch the next batch, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1
        self.step_no += 1
        return time.perf_counter() - t0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.block
