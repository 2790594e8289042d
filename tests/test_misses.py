"""The miss analysis, the copy mixture and the learned keep score.

- `with_copy` gives a distribution; nothing copied leaves the model's own; copied mass is a floor.
- `EpisodicMemory.holds` finds an entry written with the text and not one never written.
- With the copy on, an exact stored context decides the output even in an untrained model.
- The learned keep score decides retention where surprise ties; its loss trains the keep head alone.
- `misses.classify`: with nothing written, no miss is "not kept" or "not read" (the text never held
  the context); a memory written with the very rests (nothing evicted) never reports "not in text"
  or "not kept". Counts add up to the misses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from imm_cli.config import MemoryConfig, ModelConfig
from imm_cli.experiments import misses, probe
from imm_cli.memory import Segment
from imm_cli.model import GPT, with_copy
from imm_cli.train import episode_loss


def tiny(seed: int = 0, **memory) -> GPT:
    """An untrained model; without the kNN-LM mix unless asked (its read alone, the model's own output)."""
    torch.manual_seed(seed)
    memory = {"knn_lm": 0.0, **memory}
    return GPT(ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=32,
                           memory=MemoryConfig(key_dim=16, size=512, **memory))).eval()


def test_with_copy_is_a_mixture():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 256, generator=g)
    none = torch.zeros(2, 3, 256)
    torch.testing.assert_close(with_copy(logits, none), torch.log_softmax(logits, -1))
    copied = torch.zeros(2, 3, 256)
    copied[..., 7] = 0.6  # the memory proposes byte 7 with weight 0.6
    p = with_copy(logits, copied).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3))
    assert (p[..., 7] >= 0.6).all()
    assert torch.allclose(p[..., 8], torch.softmax(logits, -1)[..., 8] * 0.4)


def test_holds_what_was_written_only():
    model = tiny()
    text = b"The quick brown fox jumps over the lazy dog, twice over."
    state, _ = probe.write_text(model, model.init_state(1), probe.as_ids([text], "cpu"))
    ids = probe.as_ids([text[:30]], "cpu")  # context ending at byte 29, whose next byte is text[30]
    assert bool(model.memory.holds(state, ids, torch.tensor([text[30]]))[0])
    assert not bool(model.memory.holds(state, ids, torch.tensor([ord("#")]))[0])
    other = probe.as_ids([b"A sentence that was never written here."], "cpu")
    assert not bool(model.memory.holds(state, other, torch.tensor([ord(" ")]))[0])


def _rows(model: GPT):
    rests = [b" went to the market on Tuesday.", b" sings in the choir every Sunday.", b" has three green boats."]
    prompts = probe.as_ids([b"Zorvak Tennel", b"Quibel Harrow", b"Mendrik Olsen"], "cpu")
    return prompts, rests


def test_nothing_written_means_never_held():
    model = tiny()
    prompts, rests = _rows(model)
    state = model.init_state(3)
    gen = probe.complete(model, state, prompts, max(len(r) for r in rests))
    out = misses.classify(model, state, prompts, rests, gen, [b""])
    assert out["rows"] == 3 and out["misses"] == sum(out["causes"].values())
    assert out["misses"] == sum(not g.startswith(r) for g, r in zip(gen, rests))
    assert out["misses"] > 0  # an untrained model misses
    assert out["causes"]["not_kept"] == out["causes"]["not_read"] == 0
    assert all(e["cause"] in ("window", "outvoted", "not_in_text") for e in out["examples"])


def _written(model: GPT):
    prompts, rests = _rows(model)
    texts = [bytes(p.tolist()) + r for p, r in zip(prompts, rests)]  # each row's memory holds its own fact
    state, _ = probe.write_text(model, model.init_state(3), probe.as_ids([t.ljust(64) for t in texts], "cpu"))
    gen = probe.complete(model, state, prompts, max(len(r) for r in rests))
    return state, prompts, rests, texts, gen


def test_misses_with_everything_written_are_not_retention():
    model = tiny(1, copy=False)  # the read alone: an untrained model's residual update rarely decides
    state, prompts, rests, texts, gen = _written(model)
    out = misses.classify(model, state, prompts, rests, gen, texts)
    assert out["misses"] == sum(not g.startswith(r) for g, r in zip(gen, rests)) > 0
    assert out["causes"]["not_in_text"] == out["causes"]["not_kept"] == 0
    merged = misses.merge([out, out])
    assert merged["misses"] == 2 * out["misses"] and merged["rows"] == 6


def test_copy_lets_an_exact_context_decide():
    """With the copy on, an exact stored context outvotes the model even untrained: the sharp read
    puts ~all its mass on the entry, and the copy weight (0.5 at initialisation) carries it to the output."""
    model = tiny(1, copy=True)
    state, prompts, rests, texts, gen = _written(model)
    assert [g[:len(r)] for g, r in zip(gen, rests)] == rests
    assert misses.classify(model, state, prompts, rests, gen, texts)["misses"] == 0
    with model.memory_mode(ablated=True):  # the same model without its memory does not know the facts
        assert probe.complete(model, state, prompts, max(len(r) for r in rests)) != gen


def test_knn_lm_mixes_at_inference_only():
    """The fixed kNN-LM weight (--memory-knn-lm): in eval mode an exact stored context decides the
    output even untrained; in training mode (and with the weight 0) the output is the model's own,
    so training never learns to lean on the mix (the learned --memory-copy did, measured)."""
    from imm_cli.experiments.setup import set_knn_lm

    model = tiny(1, knn_lm=0.2, far_weight=0.0)  # the mix alone (the far key is inference-only too)
    state, prompts, rests, texts, gen = _written(model)
    assert [g[:len(r)] for g, r in zip(gen, rests)] == rests
    assert misses.classify(model, state, prompts, rests, gen, texts)["misses"] == 0
    seg_ids = prompts[:, -8:]
    logits = {}
    for name, train, weight in (("eval", False, 0.2), ("train", True, 0.2), ("off", False, 0.0)):
        set_knn_lm(model, weight)
        model.train(train)
        assert model.memory.copies == (name == "eval")
        with torch.no_grad():
            logits[name] = model(seg_ids, state=state).logits
    model.eval()
    torch.testing.assert_close(logits["train"], logits["off"])  # no dropout: train and eval differ by the mix alone
    assert not torch.allclose(logits["eval"], logits["off"])
    set_knn_lm(model, 0.0)
    assert probe.complete(model, state, prompts, max(len(r) for r in rests)) != gen  # the same model, its own output


def test_an_exact_context_votes_with_knn_exact():
    """--memory-knn-exact: a stored entry whose context is exactly the query's proposes its byte with
    that weight, any other entry with --memory-knn-lm (Drozdov et al. 2022); --knn-lm 0 mixes nothing."""
    from imm_cli.experiments.setup import set_knn_lm
    from imm_cli.memory import Segment
    from imm_cli.memory.episodic import EXACT_COS

    model = tiny(1, knn_lm=0.2)
    state, _, _, texts, _ = _written(model)
    ids = probe.as_ids([t.ljust(64)[:48] for t in texts], "cpu")
    ids[:, 30] = ord("#")  # the 16 positions after it have no exact stored context
    seg = Segment(ids=ids, prev=ids[:, :0], targets=ids)
    mem = model.memory
    copied = {}
    for exact in (0.0, 0.6):
        set_knn_lm(model, 0.2, exact)
        with torch.no_grad():
            parts = mem._segment_parts(seg, state)
            mem._gated(torch.zeros(*ids.shape, model.cfg.n_embd), mem._mix(parts), parts)
        copied[exact] = mem.copied.sum(-1)
    sharp, same = parts["attn"][-1], parts["near"] >= EXACT_COS  # the near keys: the same key_bytes of context
    on_exact, on_other = (sharp * same).sum(-1), (sharp * ~same).sum(-1)
    assert on_exact.max() > 0.5 and on_other.max() > 0.5  # both kinds of entry are read somewhere
    torch.testing.assert_close(copied[0.0], 0.2 * (on_exact + on_other))
    torch.testing.assert_close(copied[0.6], 0.6 * on_exact + 0.2 * on_other)
    set_knn_lm(model, 0.0)
    assert not mem.copies  # the weight 0 is the model's own distribution, whatever knn_exact says


def test_knn_lm_override_needs_the_episodic_memory():
    from imm_cli.errors import InputError
    from imm_cli.experiments.setup import set_knn_lm

    torch.manual_seed(0)
    lin = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, memory=MemoryConfig(kind="linformer")))
    with pytest.raises(InputError, match="only the episodic memory"):
        set_knn_lm(lin, 0.2)
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        set_knn_lm(tiny(), 1.0)


def test_memory_size_override_sets_the_budget_retention_keeps():
    """set_memory_size: the same weights under another budget; writing more positions than it holds
    keeps exactly that many entries (retention acts), and training's range rule still holds."""
    from imm_cli.errors import InputError
    from imm_cli.experiments.setup import set_memory_size

    torch.manual_seed(0)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_memory_size(model, 40)
    mem = model.memory
    state = mem.init_state(1)
    assert state["keys"].shape[1] == 40 and model.cfg.memory.size == 40
    from imm_cli.experiments.probe import write_text

    with torch.no_grad():
        state, _ = write_text(model, state, torch.randint(0, 256, (1, 3 * model.cfg.block_size)))
    assert int(torch.isfinite(state["score"]).sum()) == 40  # full, and never more than the budget
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights unchanged
    with pytest.raises(InputError, match="--memory-size"):
        set_memory_size(model, 0)


def test_keep_score_decides_what_stays():
    """With --memory-keep, an entry's retention score adds the keep head's score: entries the head
    marks stay in a full budget over equally surprising ones."""
    torch.manual_seed(0)
    mem = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32,
                          memory=MemoryConfig(key_dim=16, size=8, keep=5.0))).memory
    with torch.no_grad():  # the head marks positions whose hidden state has feature 0 set
        mem.keep_head.weight.zero_()
        mem.keep_head.weight[0, 0] = 20.0
        mem.keep_head.bias.fill_(-10.0)
    ids = torch.randint(97, 123, (1, 32))
    seg = Segment(ids=ids, prev=ids[:, :0], targets=torch.randint(97, 123, (1, 32)))
    h = torch.zeros(1, 32, 32)
    marked = [3, 7, 11, 12, 20, 25, 28, 30]
    h[0, marked, 0] = 1.0
    state = mem.write(h, seg, mem.init_state(1), torch.full((1, 32), 2.0))  # every byte equally surprising
    kept = sorted(seg.targets[0, marked].tolist())
    assert sorted(state["bytes"][0].tolist()) == kept
    assert torch.isfinite(state["score"]).all()


def test_keep_loss_trains_only_the_keep_head():
    """The keep head's loss reaches the keep head alone (it reads detached hidden states), and the
    reported loss is the language-model loss unchanged."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, memory=MemoryConfig(key_dim=16, keep=1.0)))
    x, y = torch.randint(97, 101, (2, 4, 32)), torch.randint(97, 101, (2, 4, 32))
    loss, _ = episode_loss(model, x, y)
    loss.backward()
    with_aux = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model.episode(x, y)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if "keep_head" in name:
            assert p.grad is None or p.grad.abs().sum() == 0
            assert with_aux[name].abs().sum() > 0
        else:
            torch.testing.assert_close(with_aux[name], p.grad, msg=name)


def test_drop_hides_entries_in_training_only():
    """--memory-drop: in training, stored entries are hidden from reads at random (as if retention had
    let them go), in both the whole-episode read and the segment loop's writes; never in eval mode."""
    model = tiny(1, drop=0.9)
    mem = model.memory
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 64), generator=g)
    y = torch.cat([x[:, :, 1:], torch.randint(0, 256, (2, 3, 1), generator=g)], 2)
    with torch.no_grad():
        state = model(x[:, 0], y[:, 0]).state  # eval mode: every position kept
        assert int(torch.isfinite(state["score"]).sum()) == 2 * 64
        model.train()
        dropped = model(x[:, 0], y[:, 0]).state  # training: about 90% let go
        assert int(torch.isfinite(dropped["score"]).sum()) < 2 * 64 // 2
        # the whole-episode read: the last segment reads a memory missing most entries, so its loss changes
        hidden = model.episode(x, y).token_loss[:, -1]
        model.memory.cfg = dataclasses.replace(mem.cfg, drop=0.0)
        kept = model.episode(x, y).token_loss[:, -1]
    assert not torch.allclose(hidden, kept)


def test_the_far_key_breaks_a_tie_between_facts_sharing_a_long_phrase():
    """Two facts whose answers follow the same phrase, longer than key_bytes: the answers' keys are
    the same, so the read cannot tell them apart; the far key (the bytes before the phrase) can.
    Inference only: a state written with the far key off is read with it on (the part both have)."""
    from imm_cli.experiments.setup import set_far_weight

    model = tiny(1, knn_lm=0.35, knn_exact=0.6, far_weight=0.3)
    phrase = b" keeps the lantern of hall "  # 27 bytes: the subject sits beyond the 16 key bytes
    facts = [b"Orvek Dazu" + phrase + b"4", b"Tazim Kolv" + phrase + b"7"]
    row = probe.as_ids([facts[0].ljust(64) + facts[1].ljust(64)], "cpu")
    prompts = probe.as_ids([f[:-1] for f in facts], "cpu")

    def answers() -> list[str]:
        state, _ = probe.write_text(model, model.init_state(1), row)
        with torch.no_grad():
            return [chr(int(model(p[None], state=state).logits[0, -1].argmax())) for p in prompts]

    assert answers() == ["4", "7"]
    set_far_weight(model, 0.0)
    off = answers()
    assert off != ["4", "7"] and off[0] == off[1]  # one answer for both: the tie
    state, _ = probe.write_text(model, model.init_state(1), row)  # written without the far key
    set_far_weight(model, 0.3)
    with torch.no_grad():
        assert model(prompts[:1], state=state).logits.isfinite().all()


def test_the_far_key_is_off_in_training():
    """Training never sees the far key: the same initialisation trains to the same loss and gradients
    with any far weight (its table is drawn from its own generator, not the global one)."""
    from imm_cli.train import episode_loss

    x, y = torch.randint(97, 101, (2, 4, 64)), torch.randint(97, 101, (2, 4, 64))
    losses, grads = [], []
    for far in (0.0, 0.3):
        model = tiny(1, far_weight=far).train()
        assert model.memory.key_width == 16
        loss, _ = episode_loss(model, x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.memory.key_emb.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
