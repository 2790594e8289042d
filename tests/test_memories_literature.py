"""The memories from the literature on hand-made inputs: each does what its paper's equation says.

- delta (Schlag et al. 2021; DeltaNet, Yang et al. 2024): W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T;
- knn (Memorizing Transformers, Wu et al. 2022): per-position keys/values, top-k read, FIFO budget;
- titans (Behrouz et al. 2024): an MLP trained at inference, S_t = eta_t S_{t-1} - theta_t grad,
  M_t = (1 - alpha_t) M_{t-1} + S_t.
The interface properties (frozen, reset, fresh reads zero, slot order, ...) of all of them run in
tests/test_memory_properties.py and tests/test_core.py with every other registered kind.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imm_cli.config import MemoryConfig
from imm_cli.memory import KINDS, Segment, build_memory
from imm_cli.memory.delta import DeltaMemory, delta_write, delta_write_loop
from imm_cli.memory.knn import KNNMemory
from imm_cli.memory.titans import TitansMemory, mlp, titans_write, titans_write_loop


def seg(b: int, n: int) -> Segment:
    ids = torch.zeros(b, n, dtype=torch.long)
    return Segment(ids=ids, prev=ids[:, :0], targets=ids)


def identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(*linear.weight.shape))


def test_all_are_registered():
    assert KINDS["knn"] is KNNMemory and KINDS["delta"] is DeltaMemory and KINDS["titans"] is TitansMemory


# --- delta ---------------------------------------------------------------------------------------
def test_delta_rule_one_write_with_beta_one_stores_the_value_exactly():
    W = torch.zeros(1, 3, 4)
    k = torch.tensor([[[0.0, 0.6, 0.0, 0.8]]])  # a unit key
    v = torch.tensor([[[1.0, -2.0, 3.0]]])
    W1 = delta_write(W, k, v, torch.ones(1, 1))
    assert torch.allclose(W1[0] @ k[0, 0], v[0, 0], atol=1e-6)  # W k = v
    assert torch.allclose(W1[0], torch.outer(v[0, 0], k[0, 0]), atol=1e-6)  # = v k^T, the equation from W = 0
    # a second write under the same key replaces the value (the delta rule removes W k first)
    v2 = torch.tensor([[[5.0, 0.0, -1.0]]])
    W2 = delta_write(W1, k, v2, torch.ones(1, 1))
    assert torch.allclose(W2[0] @ k[0, 0], v2[0, 0], atol=1e-6)
    # beta = 0.25: the stored value moves a quarter of the way
    W3 = delta_write(W1, k, v2, torch.full((1, 1), 0.25))
    assert torch.allclose(W3[0] @ k[0, 0], v[0, 0] + 0.25 * (v2[0, 0] - v[0, 0]), atol=1e-6)


def test_delta_orthogonal_keys_do_not_disturb_each_other():
    k = torch.eye(4)[None, :2]  # two orthogonal unit keys, written in one segment
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    W = delta_write(torch.zeros(1, 2, 4), k, v, torch.ones(1, 2))
    assert torch.allclose(W[0] @ k[0].t(), v[0].t(), atol=1e-6)


def test_delta_chunk_form_equals_the_sequential_recurrence():
    torch.manual_seed(0)
    b, n, dk, dv = 2, 40, 8, 5
    W0 = torch.randn(b, dv, dk)
    k = F.normalize(torch.randn(b, n, dk), dim=-1)
    k[:, 7] = k[:, 3]  # a repeated key inside the segment
    v, beta = torch.randn(b, n, dv), torch.rand(b, n)
    assert torch.allclose(delta_write(W0, k, v, beta), delta_write_loop(W0, k, v, beta), atol=1e-5)


def delta_memory(d: int = 4, dk: int = 4) -> DeltaMemory:
    mem = build_memory(MemoryConfig(kind="delta", slots=2, key_dim=dk), d)
    mem.post_init()
    for lin in (mem.q, mem.k, mem.v, mem.out):
        identity(lin)
    with torch.no_grad():  # beta = sigmoid(20) ~ 1
        mem.beta.weight.zero_()
        mem.beta.bias.fill_(20.0)
    return mem


def test_delta_memory_reads_back_what_it_wrote():
    """Identity projections: writing h (a unit vector) stores W h = h, and reading with h returns it, gated."""
    mem = delta_memory()
    h = torch.eye(4)[None, :2]  # two positions, orthogonal unit hidden states
    with torch.no_grad():
        state = mem.write(h, seg(1, 2), mem.init_state(1), torch.zeros(1, 2))
        read = mem.read(h, seg(1, 2), state)
    gate = torch.sigmoid(mem.gate(h))
    assert torch.allclose(read, gate * h, atol=1e-6)


def test_delta_memory_fresh_reads_zero_and_gradients_flow_through_writes():
    mem = delta_memory()
    h = torch.randn(2, 5, 4, requires_grad=True)
    assert torch.equal(mem.read(h, seg(2, 5), mem.init_state(2)), torch.zeros(2, 5, 4))
    state = mem.write(h, seg(2, 5), mem.init_state(2), torch.zeros(2, 5))
    mem.read(torch.randn(2, 3, 4), seg(2, 3), state).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0  # the read depends on what was written
    assert all(p.grad is not None for p in (mem.k.weight, mem.v.weight, mem.beta.weight))


def test_delta_state_has_no_slot_axis():
    """Why the property tests' slot-order check is vacuous for delta: the state is one matrix per
    sequence (axis 1 is its single head), and the rows of W are not interchangeable entries --
    permuting them changes what W q returns -- so there is no order the read could ignore."""
    mem = delta_memory()
    state = mem.write(torch.randn(1, 3, 4), seg(1, 3), mem.init_state(1), torch.zeros(1, 3))
    assert set(state) == {"W"} and state["W"].shape == (1, 1, 4, 4)
    rows = {"W": state["W"][:, :, torch.tensor([1, 0, 2, 3])]}
    h = torch.randn(1, 2, 4)
    assert not torch.allclose(mem.read(h, seg(1, 2), state), mem.read(h, seg(1, 2), rows))


def test_delta_slots_are_reads_along_fixed_probes():
    mem = build_memory(MemoryConfig(kind="delta", slots=3, key_dim=8), 16)
    P = mem.probes()
    assert P.shape == (3, 8) and torch.allclose(P @ P.t(), torch.eye(3), atol=1e-5)  # orthonormal rows
    assert torch.equal(P, mem.probes())  # the same every call
    state = mem.write(torch.randn(2, 6, 16), seg(2, 6), mem.init_state(2), torch.zeros(2, 6))
    assert torch.allclose(mem.slot_vectors(state), mem.out(P @ state["W"][:, 0].transpose(1, 2)))
    assert not mem.slot_filled(mem.init_state(2)).any() and mem.slot_filled(state).all()
    many = build_memory(MemoryConfig(kind="delta", slots=12, key_dim=8), 16).probes()  # more slots than dk
    assert torch.allclose(many.t() @ many, torch.eye(8), atol=1e-5)  # a tight frame: sum (q.p)^2 = |q|^2


# --- knn -----------------------------------------------------------------------------------------
def knn_memory(d: int = 8, size: int = 64, topk: int = 4, slots: int = 4) -> KNNMemory:
    mem = build_memory(MemoryConfig(kind="knn", slots=slots, size=size, topk=topk, key_dim=d, temp=0.05), d)
    mem.post_init()
    for lin in (mem.q, mem.k, mem.v, mem.out):
        identity(lin)
    with torch.no_grad():
        mem.log_scale.fill_(torch.log(torch.tensor(100.0)))  # sharp: a cosine of 1 beats 0.9 by e^10
    return mem


def test_knn_retrieves_the_exact_value_of_a_repeated_key_among_many():
    """200 stored positions, top-4 read per head: a query equal to a stored key reads that entry's value."""
    torch.manual_seed(0)
    d, mem = 64, knn_memory(d=64, size=256, topk=4)
    assert mem.heads == 4  # each head matches its own 16-wide slice of the key
    stored = torch.randn(1, 200, d)
    state = mem.init_state(1)
    for chunk in stored.split(50, dim=1):  # four writes of 50 positions
        state = mem.write(chunk, seg(1, 50), state, torch.zeros(1, 50))
    assert state["age"].ge(0).sum() == 200
    cue = stored[:, [17, 123, 199]]  # queries that repeat stored keys exactly
    with torch.no_grad():
        read = mem.read(cue, seg(1, 3), state)
        gate = torch.sigmoid(mem.gate(cue)).repeat_interleave(d // mem.heads, dim=-1)  # per head, per channel
    assert torch.allclose(read / gate, cue, atol=1e-3)  # value = h of the matching position


def test_knn_fifo_drops_the_oldest_entries_beyond_the_budget():
    mem = knn_memory(d=4, size=8, slots=2)
    state = mem.init_state(1)
    for w in range(3):  # 3 writes of 4 positions into a budget of 8: the first write is evicted
        h = torch.full((1, 4, 4), float(w + 1))
        state = mem.write(h, seg(1, 4), state, torch.zeros(1, 4))
    assert sorted(state["age"][0].tolist()) == list(range(4, 12))  # positions 4..11 kept
    assert set(state["values"][0, :, 0].tolist()) == {2.0, 3.0}
    assert torch.equal(state["values"][0, :4, 0], torch.full((4,), 3.0))  # the ring: write 3 took write 1's entries
    assert state["count"].item() == 12
    # a segment longer than the budget keeps only its last `size` positions
    h = torch.arange(10.0).view(1, 10, 1).expand(1, 10, 4)
    state = mem.write(h, seg(1, 10), mem.init_state(1), torch.zeros(1, 10))
    assert sorted(state["age"][0].tolist()) == list(range(2, 10))
    assert sorted(state["values"][0, :, 0].tolist()) == [float(i) for i in range(2, 10)]


def test_knn_fresh_memory_reads_zero_and_writes_are_detached():
    mem = knn_memory()
    h = torch.randn(2, 5, 8, requires_grad=True)
    assert torch.equal(mem.read(h, seg(2, 5), mem.init_state(2)), torch.zeros(2, 5, 8))
    state = mem.write(h, seg(2, 5), mem.init_state(2), torch.zeros(2, 5))
    assert not any(v.requires_grad for v in state.values())  # no backpropagation into the memory
    assert not mem.k.weight.requires_grad and not mem.v.weight.requires_grad
    mem.read(torch.randn(2, 3, 8), seg(2, 3), state).sum().backward()
    assert mem.q.weight.grad is not None and mem.out.weight.grad is not None


def test_knn_partly_filled_memory_ignores_empty_entries_and_observes_per_slot():
    mem = knn_memory(d=8, size=16, topk=8, slots=4)
    h = F.normalize(torch.randn(1, 3, 8), dim=-1)
    state = mem.write(h, seg(1, 3), mem.init_state(1), torch.zeros(1, 3))  # 3 entries, all in slot 0
    mem.observe = True
    read = mem.read(h, seg(1, 3), state)
    assert torch.isfinite(read).all()
    rec = mem.observed[-1]
    assert rec["read_attn"].shape == (1, 3, 4) and rec["gate"].shape == (1, 3)
    assert torch.allclose(rec["read_attn"].sum(-1), torch.ones(1, 3))  # every head's mass lands on stored entries
    assert torch.equal(rec["read_attn"][..., 1:], torch.zeros(1, 3, 3))  # ... all of it in slot 0
    assert mem.slot_filled(state).tolist() == [[True, False, False, False]]
    vecs = mem.slot_vectors(state)
    assert torch.allclose(vecs[0, 0], h[0].mean(0), atol=1e-6) and torch.equal(vecs[0, 1:], torch.zeros(3, 8))


@pytest.mark.parametrize("kind", ["knn", "delta", "titans"])
def test_a_tiny_gpt_trains_through_the_memory(kind):
    """Loss and gradients through an episode of 3 segments in the GPT (the loop carries the state)."""
    from imm_cli.config import ModelConfig
    from imm_cli.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16,
                            memory=MemoryConfig(kind=kind, slots=2, size=64, key_dim=8)))
    x = torch.randint(0, 256, (2, 3, 16))
    out = model.episode(x, torch.roll(x, -1, dims=-1))
    assert out.logits.shape == (2, 3, 16, 256) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.memory.q.weight.grad.abs().sum() > 0  # the later segments' reads reach the query


# --- titans --------------------------------------------------------------------------------------
def titans_state(b: int = 2, dk: int = 4, dh: int = 8, dv: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {"W1": r(b, dh, dk), "W2": r(b, dh, dv) * 0.3, "S1": r(b, dh, dk) * 0.1, "S2": r(b, dh, dv) * 0.1}


@pytest.mark.parametrize("n", [1, 7, 32])
def test_titans_chunk_form_equals_the_sequential_recurrence(n):
    """The one-step write (gradients in closed form, momentum and decay unrolled) against the
    position-by-position recurrence whose gradients autograd takes."""
    torch.manual_seed(n)
    state = titans_state()
    k, v = F.normalize(torch.randn(2, n, 4), dim=-1), torch.randn(2, n, 5)
    theta, log_eta, log_keep = torch.rand(2, n), -2 * torch.rand(2, n), -0.2 * torch.rand(2, n)
    fast, slow = titans_write(state, k, v, theta, log_eta, log_keep), titans_write_loop(state, k, v, theta, log_eta, log_keep)
    for name in state:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-5, msg=name)


def test_titans_write_moves_the_memory_towards_the_value_and_forgets_by_alpha():
    state = titans_state(b=1)
    k, v = F.normalize(torch.randn(1, 1, 4), dim=-1), torch.randn(1, 1, 5)
    before = (mlp(state["W1"], state["W2"], k) - v).norm()
    keep_all = torch.zeros(1, 1)
    after = titans_write(state, k, v, torch.ones(1, 1), torch.full((1, 1), -30.0), keep_all)  # no momentum carried
    assert (mlp(after["W1"], after["W2"], k) - v).norm() < before  # one gradient step on |M(k) - v|^2
    # theta = 0 (no step), eta -> 0 (old momentum dropped): the weights only decay, by exactly 1 - alpha
    still = titans_write(state, k, v, torch.zeros(1, 1), torch.full((1, 1), -30.0), torch.full((1, 1), -0.5))
    torch.testing.assert_close(still["W2"], state["W2"] * torch.exp(torch.tensor(-0.5)) + state["S2"] * torch.exp(torch.tensor(-0.5 - 30.0)))


def test_titans_memory_fresh_reads_zero_and_gradients_flow_through_writes():
    mem = build_memory(MemoryConfig(kind="titans", slots=2, key_dim=4), 8)
    mem.post_init()
    h = torch.randn(2, 5, 8, requires_grad=True)
    assert torch.equal(mem.read(h, seg(2, 5), mem.init_state(2)), torch.zeros(2, 5, 8))
    state = mem.write(h, seg(2, 5), mem.init_state(2), torch.zeros(2, 5))
    mem.read(torch.randn(2, 3, 8), seg(2, 3), state).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0  # the read depends on what was written
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (mem.k.weight, mem.v.weight, mem.rates.weight, mem.w1_init))


def test_titans_stays_bounded_over_many_writes_at_any_input_scale():
    """Normalised steps: a hundred writes of large hidden states leave the weights finite and small."""
    torch.manual_seed(0)
    mem = build_memory(MemoryConfig(kind="titans", slots=2, key_dim=8), 16)
    mem.post_init()
    with torch.no_grad():
        state = mem.init_state(2)
        for _ in range(100):
            state = mem.write(torch.randn(2, 32, 16) * 30, seg(2, 32), state, torch.zeros(2, 32))
    assert all(torch.isfinite(t).all() for t in state.values())
    assert state["W2"].abs().max() < 100


def test_titans_hidden_units_are_its_interchangeable_slots():
    """Permuting the MLP's hidden units in all four state tensors (axis 1) leaves every read unchanged."""
    mem = build_memory(MemoryConfig(kind="titans", slots=3, key_dim=4), 8)
    mem.post_init()
    state = mem.write(torch.randn(1, 6, 8), seg(1, 6), mem.init_state(1), torch.zeros(1, 6))
    perm = torch.randperm(8)
    h = torch.randn(1, 4, 8)
    torch.testing.assert_close(mem.read(h, seg(1, 4), {k: v[:, perm] for k, v in state.items()}), mem.read(h, seg(1, 4), state))
    assert mem.slot_vectors(state).shape == (1, 3, 8)
    assert not mem.slot_filled(mem.init_state(1)).any() and mem.slot_filled(state).all()
