"""The core: shapes, the three memory switches, save/load, cached generation, and `imm train` end to end.

(The byte round trip lives in test_data.py.)
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY
from imm_cli import runs
from imm_cli.cli.app import app
from imm_cli.config import LEGACY_DEFAULTS, MEMORY_KINDS, MemoryConfig, ModelConfig, TrainConfig
from imm_cli.memory.episodic import FAR_DIM
from imm_cli.model import GPT

KINDS = list(MEMORY_KINDS)  # every registered memory (config.MEMORIES)


def tiny_model(kind: str = "episodic", slots: int = 4, seed: int = 0, **memory) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32,
                      memory=MemoryConfig(kind=kind, slots=slots, entries=8, key_dim=16, **memory))
    return GPT(cfg).eval()


def batch(b: int = 2, n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, n + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_with_memory(kind):
    model = tiny_model(kind, slots=4)
    x, y = batch(b=3, n=16)
    out = model(x, y)
    assert out.logits.shape == (3, 16, 256)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.token_loss.shape == (3, 16)
    state = out.state
    assert all(v.shape[0] == 3 for v in state.values())  # one row per sequence in every state tensor
    if kind == "linformer":
        assert state["slots"].shape == (3, 4, 32)
    elif kind == "episodic":
        M = model.cfg.memory.size
        width = 16 + (FAR_DIM if not model.training else 0)  # at inference a key carries the far key too
        assert model.memory.key_width == width
        assert state["keys"].shape == (3, M, width) and state["bytes"].shape == (3, M)
        assert state["score"].shape == (3, M) and torch.isfinite(state["score"]).sum(1).eq(8).all()  # entries=8 offered
    assert model.memory.slot_vectors(state).shape == (3, 4, 32)
    assert model.memory.slot_filled(state).shape == (3, 4)


def test_shapes_without_memory():
    model = tiny_model(slots=0)
    assert model.memory is None and model.init_state(2) is None
    x, y = batch()
    out = model(x, y)
    assert out.logits.shape == (2, 16, 256)
    assert out.state is None
    total, mem = model.num_params()
    assert mem == 0 and total > 0


# --- the three switches ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_memory_leaves_state_unchanged(kind):
    model = tiny_model(kind)
    x, y = batch()
    state = model(x, y).state  # one write, so the state is not the initial one
    before = {k: v.clone() for k, v in state.items()}
    with model.memory_mode(frozen=True):
        out = model(*batch(seed=7), state=state)
    assert states_equal(out.state, before)
    assert states_equal(state, before)  # and the caller's state was not changed in place
    assert not states_equal(model(*batch(seed=7), state=state).state, before)  # unfrozen, it writes


@pytest.mark.parametrize("kind", KINDS)
def test_ablated_memory_is_exactly_the_read_free_model(kind):
    model = tiny_model(kind)
    base = GPT(replace(model.cfg, memory=replace(model.cfg.memory, slots=0))).eval()
    shared = {k: v for k, v in model.state_dict().items() if k in base.state_dict()}
    assert set(shared) == set(base.state_dict())  # every baseline weight exists in the memory model
    base.load_state_dict(shared)
    x, y = batch()
    state = model(x, y).state  # a written state: the read would change the logits
    with model.memory_mode(ablated=True):
        ablated = model(*batch(seed=3), state=state).logits
    assert torch.equal(ablated, base(*batch(seed=3)).logits)
    assert not torch.equal(model(*batch(seed=3), state=state).logits, ablated)  # the read does matter


@pytest.mark.parametrize("kind", KINDS)
def test_reset_gives_the_initial_state(kind):
    model = tiny_model(kind)
    fresh = model.init_state(2)
    written = model(*batch(), state=model.init_state(2)).state
    assert not states_equal(written, fresh)
    assert states_equal(model.init_state(2), fresh)


# --- save and load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*KINDS, "none"])
def test_save_and_load_give_identical_logits(kind, tmp_path):
    model = tiny_model("episodic" if kind == "none" else kind, slots=0 if kind == "none" else 4)
    with torch.no_grad():  # move every weight away from its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    runs.save_weights(tmp_path, model, step=7)
    runs.save_config(tmp_path, model.cfg, TrainConfig())
    loaded, cfg = runs.load_run(tmp_path)
    assert loaded.cfg == model.cfg and cfg["format_version"] == 1
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()  # still tied after loading
    x, y = batch()
    a, b = model(x, y), loaded(x, y)
    assert torch.equal(a.logits, b.logits)
    if kind != "none":
        assert states_equal(a.state, b.state)
    assert not list(tmp_path.glob(runs.TMP_PREFIX + "*"))


@pytest.mark.parametrize("field, old", sorted(LEGACY_DEFAULTS[MemoryConfig].items()))
def test_run_saved_before_a_field_existed_loads_with_its_old_meaning(field, old, tmp_path):
    """config.json files written before a memory field existed mean its legacy value: `value_dim` 0
    (full-width, n_embd values), `sharp` 0 (the learned-temperature read alone), `copy` False (no
    next bytes copied into the output), `keep` 0 (retention by surprise alone, no keep head), `knn_lm` 0
    (no kNN-LM mix at inference), `trail` False (retention by the centred span alone),
    `shared_values` False (each read channel its own output projection)."""
    model = tiny_model("episodic", slots=4, **{field: old})
    runs.save_weights(tmp_path, model, step=1)
    runs.save_config(tmp_path, model.cfg, TrainConfig())
    doc = json.loads((tmp_path / runs.CONFIG).read_text())
    del doc["model"]["memory"][field]
    (tmp_path / runs.CONFIG).write_text(json.dumps(doc))
    loaded, _ = runs.load_run(tmp_path)
    assert getattr(loaded.cfg.memory, field) == old
    if field == "value_dim":
        assert loaded.memory.value_emb.weight.shape == (257, loaded.cfg.n_embd)
    if field == "shared_values":
        assert hasattr(loaded.memory, "sharp_out") and hasattr(loaded.memory, "out")
    x, y = batch()
    assert torch.equal(model(x, y).logits, loaded(x, y).logits)


# --- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached(kind):
    model = tiny_model(kind)
    with torch.no_grad():  # sharper logits than at initialisation, so the greedy path is not flat
        model.wte.weight.mul_(20)
    state = model(*batch(n=32, seed=5)).state
    prompt, _ = batch(b=2, n=6, seed=9)
    prev, _ = batch(b=2, n=10, seed=11)
    for kw in ({}, {"state": state}, {"state": state, "prev": prev}):
        cached = model.generate(prompt, 20, use_cache=True, **kw)
        uncached = model.generate(prompt, 20, use_cache=False, **kw)
        assert cached.shape == (2, 20)
        assert torch.equal(cached, uncached), kw.keys()


# --- imm train end to end --------------------------------------------------------------------------
RUN_FILES = {"config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "loss.png"}
JSON_KEYS = {"params", "memory_params", "memory_share", "val_loss", "val_loss_ablated", "tokens_per_s", "nonfinite", "run"}


@pytest.mark.parametrize("slots", ["4", "0"])
def test_imm_train_end_to_end(slots, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", *TINY, "--iters", "2", "--slots", slots, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == RUN_FILES
    doc = json.loads(r.stdout)
    assert JSON_KEYS <= set(doc)
    assert doc["run"] == str(out) and doc["nonfinite"] is False
    assert doc["params"] > 0 and doc["tokens_per_s"] > 0
    assert doc["val_loss"] > 0 and doc["val_loss_ablated"] > 0
    if slots == "0":
        assert doc["memory_params"] == 0 and doc["memory_share"] == 0
        assert doc["val_loss"] == doc["val_loss_ablated"]
    else:
        assert doc["memory_params"] > 0 and 0 < doc["memory_share"] < 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["summary"]["step"] == 2 and cfg["model"]["memory"]["slots"] == int(slots)
    steps = [row["step"] for row in runs.read_metrics(out)]
    assert steps == [1, 2]
    model, _ = runs.load_run(out)
    assert runs.load_train_state(out)["step"] == 2
