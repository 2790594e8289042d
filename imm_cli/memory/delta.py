"""DeltaMemory: a fast-weight associative memory written with the delta rule.

Schlag, Irie and Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers" (ICML
2021), and DeltaNet (Yang, Wang, Zhang, Shen and Kim, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", NeurIPS 2024). One matrix W (dv x dk) per sequence is the whole
memory. For each written position t, with h_t the layer's hidden state:

  k_t = W_k h_t / |W_k h_t|          (L2-normalised key, as DeltaNet)
  v_t = W_v h_t
  beta_t = sigmoid(w_beta . h_t + b_beta)   in (0, 1), the write strength
  W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T

i.e. the value now stored under k_t, W_{t-1} k_t, moves a fraction beta_t of the way to v_t; with
beta_t = 1 and a unit key, W_t k_t = v_t exactly, and a later write with the same key overwrites it.
Because k_t is a unit vector, I - beta_t k_t k_t^T is a contraction and W stays bounded.

Read, for every position of the following segments:  q = W_q h / |W_q h|,  o = W q, added to the
residual stream as  read = sigmoid(w_g . h + b_g) * W_o o  (the gate as the other memories': weight
zero and bias --gate-bias at first, `post_init`). In the papers the read at t uses W_t, which holds
the segment's own earlier positions too; in this seam the host block's causal attention sees the
segment, and the memory is read with the state written by the segments before it (W_o has no bias,
so a fresh memory, W = 0, reads exactly zero).

Writing a segment of n positions is the sequential recurrence above, computed exactly in one step
with the chunk form DeltaNet trains with (one chunk = the segment): W_n = W_0 + U^T K, where the rows
u_t = beta_t (v_t - W_{t-1} k_t) solve the unit lower-triangular system
  u_t + beta_t sum_{i<t} (k_t . k_i) u_i = beta_t (v_t - W_0 k_t).
Writes are differentiable: within an episode the loss backpropagates through W into W_k, W_v and
w_beta (the training loop carries the state across segments).

State: {"W": (b 1 dv dk)} -- one head (axis 1 has length 1). The state has no slots; its rows and
columns are not interchangeable entries (permuting them changes what W q returns), so the property
tests' slot-order check is vacuous here (tests/test_memories_literature.py says why).
Slots, for the experiments: S = `slots` fixed probe directions p_j of key space (a tight frame from
a fixed seed: orthonormal rows when S <= dk, orthonormal columns when S > dk, so sum_j (q . p_j)^2 =
|q|^2 = 1 then). slot_vectors = W_o W p_j, what a read along p_j returns; the usage analysis sees
(q . p_j)^2, the share of a query's energy along p_j (0 while the memory is empty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import Memory, Segment, State

PROBE_SEED = 0  # the probe directions are the same for every run and every model


def delta_write(W: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    """W (b dv dk) after the delta-rule writes of n positions (k (b n dk) unit, v (b n dv), beta (b n)),
    in order, computed in one step (DeltaNet's chunk form; exact up to float rounding)."""
    n = k.shape[1]
    rhs = beta[..., None] * (v - k @ W.transpose(1, 2))  # beta_t (v_t - W_0 k_t)
    A = torch.tril(beta[..., None] * (k @ k.transpose(1, 2)), diagonal=-1)  # beta_t k_t . k_i, i < t
    eye = torch.eye(n, device=k.device, dtype=k.dtype)
    u = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)  # (b n dv)
    return W + u.transpose(1, 2) @ k


def delta_write_loop(W: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    """The same as `delta_write`, one position at a time: W += beta_t (v_t - W k_t) k_t^T (the reference)."""
    for t in range(k.shape[1]):
        kt, vt, bt = k[:, t, :, None], v[:, t, :, None], beta[:, t, None, None]
        W = W + bt * (vt - W @ kt) @ kt.transpose(1, 2)
    return W


def probe_directions(S: int, dk: int, device=None) -> Tensor:
    """(S dk) fixed probe directions of key space: a tight frame drawn once from PROBE_SEED."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    Q, _ = torch.linalg.qr(torch.randn(max(S, dk), min(S, dk), generator=g))  # orthonormal columns
    return (Q if S >= dk else Q.t()).to(device)


def probed_read(mem: Memory, h: Tensor, written: Tensor, lookup) -> Tensor:
    """The read of a memory whose state answers a query vector (DeltaMemory, TitansMemory):
    q = W_q h / |W_q h|, then gate * W_o lookup(q). Observed, each query's energy along the fixed
    probes, (q . p_j)^2, zero while `written` (b ...) is all zeros (nothing stored yet)."""
    q = F.normalize(mem.q(h), dim=-1)  # (b n dk)
    gate = torch.sigmoid(mem.gate(h))
    if mem.observe:
        filled = written.flatten(1).ne(0).any(1).float()[:, None, None]  # (b 1 1)
        mem._record(read_attn=(q @ mem.probes(q.device).t()).square() * filled, gate=gate.squeeze(-1))
    return gate * mem.out(lookup(q))


class DeltaMemory(Memory):
    def __init__(self, cfg: MemoryConfig, n_embd: int, block_size: int = 128, bias: bool = False) -> None:
        super().__init__(cfg, n_embd)
        dk, dv = cfg.key_dim, cfg.value_dim or n_embd
        self.q = nn.Linear(n_embd, dk, bias=False)
        self.k = nn.Linear(n_embd, dk, bias=False)
        self.v = nn.Linear(n_embd, dv, bias=False)
        self.beta = nn.Linear(n_embd, 1)  # write strength; starts at sigmoid(0) = 0.5
        self.out = nn.Linear(dv, n_embd, bias=False)  # no bias: W = 0 reads exactly zero
        self.gate = nn.Linear(n_embd, 1)

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        return {"W": torch.zeros(batch, 1, self.v.out_features, self.q.out_features, device=device)}

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        return probed_read(self, h, state["W"], lambda q: q @ state["W"][:, 0].transpose(1, 2))  # W q per position

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        k = F.normalize(self.k(h), dim=-1)
        beta = torch.sigmoid(self.beta(h)).squeeze(-1)
        W = state["W"][:, 0]
        with torch.autocast(W.device.type, enabled=False):  # the solve in the state's precision (fp32), not bf16
            return {"W": delta_write(W, k.to(W.dtype), self.v(h).to(W.dtype), beta.to(W.dtype))[:, None]}

    # --- what the experiments see --------------------------------------------------------------
    def probes(self, device=None) -> Tensor:
        return probe_directions(self.cfg.slots, self.q.out_features, device)

    def slot_vectors(self, state: State) -> Tensor:
        """W_o W p_j for each probe direction p_j: what a read along p_j returns (zeros while W = 0)."""
        return self.out(self.probes(state["W"].device) @ state["W"][:, 0].transpose(1, 2))

    def slot_filled(self, state: State) -> Tensor:
        return self.slot_vectors(state).ne(0).any(-1)
