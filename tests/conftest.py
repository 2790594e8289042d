"""Shared fixtures: tiny model flags, a tiny trained run folder, and ways to call the real `imm`.

Everything is sized for a 2-core laptop: one-block models of width 32, blocks of 32 bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# flags of the smallest useful model; every CLI test adds --iters / --out itself
TINY = ["--layers", "1", "--heads", "2", "--embd", "32", "--block-size", "32", "--batch-size", "8", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # tiny models on a shared 2-core machine: one thread avoids OpenMP spin-waiting against other jobs
    import torch

    torch.set_num_threads(1)


def tiny_configs(memory: str = "episodic", slots: int = 8, iters: int = 2, **train):
    """(ModelConfig, TrainConfig) matching TINY, for calling the library directly."""
    from imm_cli.config import MemoryConfig, ModelConfig, TrainConfig

    model_cfg = ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32,
                            memory=MemoryConfig(kind=memory, slots=slots, layer=-1))
    defaults = dict(iters=iters, batch_size=8, device="cpu", eval_every=1000, eval_batches=1, save_every=1000)
    defaults.update(train)
    return model_cfg, TrainConfig(**defaults)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IMM_DEBUG", "IMM_NO_EXIT")}
    env.setdefault("PYTHONPATH", str(REPO))
    env.update({"COLUMNS": "120", "OMP_NUM_THREADS": "1"}, **extra)
    return env


def imm_command(*args: str) -> list[str]:
    """The real entry point: the installed `imm` script, else `python -m imm_cli.cli.app`."""
    script = Path(sys.executable).parent / "imm"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-m", "imm_cli.cli.app", *args]


def run_imm(args: list[str], cwd: Path | None = None, timeout: float = 120, **env: str) -> Result:
    """Run `imm ARGS` in a subprocess (IMM_DEBUG unset) and capture its output."""
    p = subprocess.run(imm_command(*args), cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                       timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def imm(capsys, monkeypatch):
    """Run `imm ARGS` in this process through the same main() as the script: fast, same exit codes."""
    from imm_cli.cli.app import main

    monkeypatch.delenv("IMM_DEBUG", raising=False)
    monkeypatch.setenv("IMM_NO_EXIT", "1")

    def call(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return call


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder trained for 2 steps (episodic memory, 8 slots). Read-only: copy it to change it."""
    from imm_cli.train import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    model_cfg, cfg = tiny_configs(iters=2)
    train(model_cfg, cfg, out)
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under roots with its mode and content hash: to prove nothing changed."""
    snap = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted([root, *root.rglob("*")]):
            st = p.lstat()
            if p.is_file() and not p.is_symlink():
                snap[str(p)] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                snap[str(p)] = ("other", st.st_mode)
    return snap
