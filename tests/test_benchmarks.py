"""The benchmark's own pieces keep working: nanoGPT's restated step learns, and the FLOP count
grows with what the memory adds (a broken contender would make bench.py's ratios meaningless)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench import Trainer, flops_per_token  # noqa: E402
from nanogpt_baseline import NanoGPTTrainer  # noqa: E402

from imm_cli.config import MemoryConfig, ModelConfig, TrainConfig  # noqa: E402
from imm_cli.data import load_corpus  # noqa: E402


def test_nanogpt_step_learns(tmp_path):
    text = "to be or not to be, that is the question. " * 200
    torch.manual_seed(0)
    t = NanoGPTTrainer(text, tmp_path, block=16, batch=4, layers=1, heads=2, d=32, lr=1e-2, iters=40)
    first = t.model(t.x, t.y).item()
    for _ in range(40):
        assert t.step() > 0
    assert t.model(t.x, t.y).item() < first - 0.5
    assert t.tokens_per_step == 64


def test_flops_per_token_counts_the_memory():
    base = flops_per_token(ModelConfig(block_size=64, memory=MemoryConfig(slots=0)), 1)
    episodic = flops_per_token(ModelConfig(block_size=64), 4)
    narrow = flops_per_token(ModelConfig(block_size=64, memory=MemoryConfig(value_dim=32)), 4)
    assert base["train"] == 3 * base["forward"]
    assert base["forward"] < narrow["forward"] < episodic["forward"]


def test_default_recipe_contender_is_imm_trains_defaults():
    """bench's second pair must time what `imm train` runs with no flags, not the reference shape."""
    t = Trainer(MemoryConfig(), load_corpus(None), model={}, train={})
    assert (t.mcfg.block_size, t.mcfg.n_embd, t.tcfg.batch_size, t.tcfg.curriculum) == (
        ModelConfig().block_size, ModelConfig().n_embd, TrainConfig().batch_size, TrainConfig().curriculum)
    assert t.segments == 4 and t.model.episode_path(t.segments, t.mcfg.block_size)
    assert t.step() > 0 and t.step_no == 1
