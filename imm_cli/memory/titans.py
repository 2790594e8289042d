"""TitansMemory: the neural long-term memory of Titans, small and faithful.

Behrouz, Zhong and Mirrokni, "Titans: Learning to Memorize at Test Time" (2024, arXiv 2501.00663).
The memory is a two-layer MLP, M(x) = W2^T gelu(W1 x), whose weights are the state: they are learned
*at inference*, by gradient descent with momentum and weight decay on an associative loss, at every
written position t (h_t the layer's hidden state):

  k_t = W_K h_t / |W_K h_t|,   v_t = W_V h_t                     (keys L2-normalised, as the paper)
  loss      l(M; x_t) = 1/2 |M(k_t) - v_t|^2                     (halved)
  surprise  S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)    (past and momentary surprise)
  forget    M_t = (1 - alpha_t) M_{t-1} + S_t                     (weight decay as forgetting)
  theta_t, eta_t, alpha_t = sigmoid(w . h_t + b), an output each of one Linear (data-dependent, as the paper)

Read (no weight update):  q = W_Q h / |W_Q h|,  y = M(q), added to the residual stream as
read = sigmoid(w_g . h + b_g) * W_o y (the gate as the other memories': weight zero and bias
--gate-bias at first, `post_init`).

Chunks (the paper's parallelisable training): within a chunk every gradient is taken at the
chunk's first weights M_0 (mini-batch gradient descent), which has a closed form per position,
  e_t = M_0(k_t) - v_t,  z_t = W1 k_t:   dW2_t = gelu(z_t) e_t^T,   dW1_t = ((W2 e_t) * gelu'(z_t)) k_t^T,
and unrolling both recurrences over the chunk's n positions gives its end as weighted sums of them:
  S_n = H_n S_0 - sum_i (H_n / H_i) theta_i g_i                   H_t = prod_{j<=t} eta_j
  M_n = B_n M_0 + sum_t (B_n / B_t) S_t                           B_t = prod_{j<=t} (1 - alpha_j)
      = B_n M_0 + c_0 S_0 - sum_i c_i theta_i g_i,   c_i = sum_{t>=i} (B_n / B_t)(H_t / H_i), c_0 likewise with H_0 = 1
(the products as sums of logs, every ratio an exp of a number <= 0). One chunk is one written
segment; `titans_write_loop` is the position-by-position reference the tests compare it with.
Writes are differentiable: within an episode the loss backpropagates through the state into W_K,
W_V and the three rates, which is how they learn what is worth memorising.

One addition to the paper: each position's step is theta_t / (n (1 + |gelu(z_t)|^2)), the chunk's mean
gradient and a normalised step (NLMS; the delta rule's unit keys normalise its step the same way).
Without it, writes of large hidden states diverged (at the property tests' scale 30: 7e7 after
five writes, then NaN); with it, theta in (0, 1) never overshoots a stored value by much, at any scale.

Where this differs from the paper, each for this seam: no 1-D convolution after the projections and
no residual or LayerNorm inside M; a segment reads the state written by the segments before it (the
host block's causal attention sees the segment itself, as for DeltaMemory); W1's initial value is a
learned parameter (the paper meta-learns M_0 as well) while W2's is zero, so a fresh memory reads
exactly zero (W_o has no bias).

State: {"W1": (b dh dk), "W2": (b dh dv), "S1", "S2": their momentum}, dh = 2 dk (--memory-key-dim):
every tensor's axis 1 is the MLP's hidden units, which are interchangeable (permuting them in all
four leaves every read the same: the property tests' slot-order check holds for them exactly).
Slots, for the experiments: as DeltaMemory's, S fixed probe directions p_j of key space (a tight
frame); slot_vectors = W_o M(p_j), what a read along p_j returns; the usage analysis sees (q . p_j)^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imm_cli.config import MemoryConfig
from imm_cli.memory.base import Memory, Segment, State
from imm_cli.memory.delta import probe_directions, probed_read

FLOOR = -60.0  # a decay or momentum weight below e^-60 (1e-26) counts as exactly 0


def mlp(W1: Tensor, W2: Tensor, x: Tensor) -> Tensor:
    """M(x) = W2^T gelu(W1 x) for x (b n dk), per sequence's weights W1 (b dh dk), W2 (b dh dv)."""
    return F.gelu(x @ W1.transpose(1, 2)) @ W2


def _gelu_grad(z: Tensor) -> Tensor:
    """d gelu(z) / dz for the exact (erf) gelu: Phi(z) + z phi(z)."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _floor(x: Tensor) -> Tensor:
    """log-weights below FLOOR as -inf: their weights are exactly 0, not denormal floats (momentum 0.5
    over a 128-byte segment is 0.5^128 = 3e-39, below float32's smallest normal 1.2e-38), which CPUs
    compute at a small fraction of the usual speed."""
    return x.masked_fill(x < FLOOR, -math.inf)


def _exp(x: Tensor) -> Tensor:
    return _floor(x).exp()


def titans_write(state: State, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_keep: Tensor) -> State:
    """The state after n positions (k (b n dk) unit, v (b n dv); theta (b n) in (0, 1); log eta and
    log (1 - alpha) (b n), as logs so that a rate of exactly 0 or 1 in float stays finite), in one
    step: gradients at the chunk's first weights, momentum and decay unrolled (see the module)."""
    W1, W2, S1, S2 = state["W1"], state["W2"], state["S1"], state["S2"]
    z = k @ W1.transpose(1, 2)  # (b n dh)
    a = F.gelu(z)
    e = a @ W2 - v  # (b n dv): M_0(k_t) - v_t
    dz = (e @ W2.transpose(1, 2)) * _gelu_grad(z)  # (b n dh)
    lb = torch.cumsum(log_keep, dim=1)  # (b n) log B_t
    lh = torch.cumsum(log_eta, dim=1)  # (b n) log H_t
    n = k.shape[1]
    later = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()  # [t, i]: t >= i
    # c_i = sum_{t >= i} exp(lb_n - lb_t + lh_t - lh_i), every exponent <= 0
    expo = (lb[:, -1:] - lb + lh)[:, :, None] - lh[:, None, :]  # (b t i)
    c = _exp(torch.logsumexp(_floor(expo.masked_fill(~later, -math.inf)), dim=1))  # (b n)
    c0 = _exp(torch.logsumexp(_floor(lb[:, -1:] - lb + lh), dim=1))  # (b) the weight of S_0 in M_n
    Bn, Hn = _exp(lb[:, -1]), _exp(lh[:, -1])  # (b)
    step = theta / (n * (1 + a.square().sum(-1)))  # (b n): the chunk's mean, each position's step normalised (see the module)
    w = torch.stack([c, _exp(lh[:, -1:] - lh)], dim=-1) * step[..., None]  # (b n 2): into M_n, into S_n
    g2 = torch.einsum("bnw,bnh,bnv->bwhv", w, a, e)  # sum_i w_i dW2_i, for M and for S
    g1 = torch.einsum("bnw,bnh,bnk->bwhk", w, dz, k)  # sum_i w_i dW1_i
    col = lambda x: x[:, None, None]  # noqa: E731  (b) -> (b 1 1)
    return {"W1": col(Bn) * W1 + col(c0) * S1 - g1[:, 0], "W2": col(Bn) * W2 + col(c0) * S2 - g2[:, 0],
            "S1": col(Hn) * S1 - g1[:, 1], "S2": col(Hn) * S2 - g2[:, 1]}


def titans_write_loop(state: State, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_keep: Tensor) -> State:
    """The same as `titans_write`, position by position, each gradient by autograd (the reference)."""
    W1_0, W2_0 = state["W1"].detach().requires_grad_(), state["W2"].detach().requires_grad_()
    W1, W2, S1, S2 = state["W1"], state["W2"], state["S1"], state["S2"]
    n = k.shape[1]
    for t in range(n):
        loss = 0.5 * (mlp(W1_0, W2_0, k[:, t:t + 1]) - v[:, t:t + 1]).square().sum()
        g1, g2 = torch.autograd.grad(loss, (W1_0, W2_0))  # per sequence: rows do not mix
        a = F.gelu(k[:, t:t + 1] @ state["W1"].transpose(1, 2))  # (b 1 dh): features at the chunk's first weights
        norm = (n * (1 + a.square().sum((1, 2))))[:, None, None]
        g1, g2 = g1 / norm, g2 / norm
        th, et, keep = theta[:, t, None, None], log_eta[:, t, None, None].exp(), log_keep[:, t, None, None].exp()
        S1, S2 = et * S1 - th * g1, et * S2 - th * g2
        W1, W2 = keep * W1 + S1, keep * W2 + S2
    return {"W1": W1, "W2": W2, "S1": S1, "S2": S2}


class TitansMemory(Memory):
    def __init__(self, cfg: MemoryConfig, n_embd: int, block_size: int = 128, bias: bool = False) -> None:
        super().__init__(cfg, n_embd)
        dk, dv = cfg.key_dim, cfg.value_dim or n_embd
        dh = 2 * dk  # the memory MLP's hidden width
        self.q = nn.Linear(n_embd, dk, bias=False)
        self.k = nn.Linear(n_embd, dk, bias=False)
        self.v = nn.Linear(n_embd, dv, bias=False)
        self.rates = nn.Linear(n_embd, 3)  # theta (step size), eta (momentum), alpha (forgetting), see post_init
        self.w1_init = nn.Parameter(torch.randn(dh, dk) / math.sqrt(dk))  # M_0's first layer (learned)
        self.out = nn.Linear(dv, n_embd, bias=False)  # no bias: a fresh memory (W2 = 0) reads exactly zero
        self.gate = nn.Linear(n_embd, 1)

    def post_init(self) -> None:
        super().post_init()
        nn.init.zeros_(self.rates.weight)  # rates start equal for every token: sigmoid of these biases
        # theta 0.5 (half a normalised step), eta 0.5, alpha 1e-4 per position (a 128-byte segment
        # keeps 0.987 of the memory, 16 KB later 0.19 is left): the memory must outlast kilobytes
        with torch.no_grad():
            self.rates.bias.copy_(torch.tensor([0.0, 0.0, -math.log(9999.0)]))

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        W1 = self.w1_init.to(device).expand(batch, -1, -1).clone()  # carries the gradient to w1_init in training
        dh, dk = W1.shape[1:]
        W2 = torch.zeros(batch, dh, self.v.out_features, device=device)
        return {"W1": W1, "W2": W2, "S1": torch.zeros(batch, dh, dk, device=device), "S2": torch.zeros_like(W2)}

    def read(self, h: Tensor, seg: Segment, state: State) -> Tensor:
        return probed_read(self, h, state["W2"], lambda q: mlp(state["W1"].to(q.dtype), state["W2"].to(q.dtype), q))

    def _write(self, h: Tensor, seg: Segment, state: State, surprise: Tensor) -> State:
        """`surprise` (the model's loss) is not used: Titans' surprise is the memory's own gradient."""
        k = F.normalize(self.k(h), dim=-1)
        r = self.rates(h).float()  # (b n 3) logits of theta, eta, alpha
        theta, log_eta, log_keep = torch.sigmoid(r[..., 0]), F.logsigmoid(r[..., 1]), F.logsigmoid(-r[..., 2])
        dtype = state["W1"].dtype
        with torch.autocast(h.device.type, enabled=False):  # the write in the state's precision (fp32), not bf16
            return titans_write(state, k.to(dtype), self.v(h).to(dtype), theta.to(dtype), log_eta.to(dtype), log_keep.to(dtype))

    # --- what the experiments see --------------------------------------------------------------
    def probes(self, device=None) -> Tensor:
        return probe_directions(self.cfg.slots, self.q.out_features, device)

    def slot_vectors(self, state: State) -> Tensor:
        """W_o M(p_j) for each probe direction p_j: what a read along p_j returns (zeros while W2 = 0)."""
        p = self.probes(state["W1"].device).expand(state["W1"].shape[0], -1, -1)
        return self.out(mlp(state["W1"], state["W2"], p))

    def slot_filled(self, state: State) -> Tensor:
        return self.slot_vectors(state).ne(0).any(-1)
