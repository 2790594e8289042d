"""torchrun/DDP on CPU (gloo), the GPU-path helpers that run anywhere, and --compile checkpoints.

Tolerances of the torchrun test, and why: a 2-process run with --batch-size B trains on exactly the
episodes of a 1-process run with --batch-size B (each process keeps half of the same global batch),
so the only difference is float summation order (two half-batch means averaged by all-reduce vs one
mean). Measured: losses agree to ~1e-6. We require each step's loss within 1e-5 (relative) and the
final weights within atol 1e-4 (Adam divides by sqrt(v), so the last float bits of tiny gradients
can move a weight by a few 1e-6 per step). Within the torchrun run the processes must agree exactly:
DDP gives every process the same averaged gradient, so both hold bit-identical weights, and the one
checkpoint (written by process 0 only) equals them bit for bit.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, clean_env, tiny_configs

from imm_cli import distributed, runs

FLAGS = ["--layers", "1", "--heads", "2", "--embd", "32", "--block-size", "32", "--batch-size", "16", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], dump: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "imm_cli.cli.app", "train", *args]
    return subprocess.run(cmd, env=clean_env(IMM_TEST_DUMP_WEIGHTS=dump), capture_output=True, text=True, timeout=timeout)


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / runs.METRICS).read_text().splitlines()]


def _single(out, iters: int, resume: bool = False):
    from imm_cli.train import train

    model_cfg, cfg = tiny_configs(iters=iters, batch_size=16, eval_every=1000, eval_batches=8, save_every=500)
    train(model_cfg, cfg, out, resume=resume)
    return load_file(out / runs.WEIGHTS)


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    run = tmp_path / "ddp"
    p = _torchrun([*FLAGS, "--iters", "4", "--out", str(run)], str(tmp_path / "w"))
    assert p.returncode == 0, p.stderr[-3000:]
    # only process 0 prints: one summary table
    assert p.stderr.count("imm train:") + p.stdout.count("imm train:") == 1, p.stderr[-2000:]
    # exactly one checkpoint set, nothing half-written, one metrics row per step (not one per process)
    assert sorted(f.name for f in run.iterdir()) == sorted([runs.CONFIG, runs.WEIGHTS, runs.TRAIN_STATE, runs.METRICS, "loss.png"])
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    saved = load_file(run / runs.WEIGHTS)
    ranks = [load_file(tmp_path / f"w.rank{r}") for r in (0, 1)]
    for held in ranks:  # every process holds exactly the weights that were saved
        assert held.keys() == saved.keys()
        assert all(torch.equal(held[k], saved[k]) for k in saved)
    cfg = json.loads((run / runs.CONFIG).read_text())
    assert cfg["train"]["batch_size"] == 16  # --batch-size is the global batch

    single = _single(tmp_path / "one", 4)
    ddp_rows, one_rows = _metrics(run), _metrics(tmp_path / "one")
    for a, b in zip(ddp_rows, one_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0)
    assert ddp_rows[-1]["val_loss"] == pytest.approx(one_rows[-1]["val_loss"], rel=1e-5)
    _assert_close(saved, single, atol=1e-4)


@pytest.mark.slow
def test_torchrun_resume_matches_single_process_resume(tmp_path):
    """Resume under DDP: every process loads process 0's training state and goes on like one process would."""
    import shutil

    run = tmp_path / "ddp"
    p = _torchrun([*FLAGS, "--iters", "2", "--out", str(run)], str(tmp_path / "w"))
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.copytree(run, tmp_path / "one")
    p = _torchrun(["--resume", str(run), "--iters", "4"], str(tmp_path / "w"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    saved = load_file(run / runs.WEIGHTS)
    assert all(torch.equal(load_file(tmp_path / "w.rank1")[k], saved[k]) for k in saved)
    single = _single(tmp_path / "one", 4, resume=True)
    for a, b in zip(_metrics(run), _metrics(tmp_path / "one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0)
    _assert_close(saved, single, atol=1e-4)


def test_outside_torchrun_nothing_is_distributed(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = distributed.setup(torch.device("cpu"))
    assert (d.rank, d.world, d.enabled, d.main) == (0, 1, False, True)
    x = torch.arange(6)
    assert torch.equal(d.shard(x), x)
    assert d.any(True) and not d.any(False)


def test_each_process_keeps_its_own_share_of_the_global_batch():
    x = torch.arange(8).view(4, 2)
    shares = [distributed.Dist(rank=r, world=2).shard(x) for r in (0, 1)]
    assert torch.equal(torch.cat(shares), x)  # disjoint, together the whole global batch
    assert not torch.equal(shares[0], shares[1])


def test_batch_not_divisible_among_processes_is_refused(tmp_path, monkeypatch):
    from imm_cli.errors import InputError
    from imm_cli.train import _train

    model_cfg, cfg = tiny_configs(iters=1)  # 8 segments = 2 episodes of 4
    with pytest.raises(InputError, match="not divisible among 3 processes"):
        _train(model_cfg, cfg, tmp_path / "r", False, lambda e: None, distributed.Dist(rank=0, world=3))


def test_precision_is_fp32_on_cpu():
    from imm_cli.train import autocast_for, precision_of

    assert precision_of(torch.device("cpu")) == "fp32"
    with autocast_for(torch.device("cpu")):
        assert not torch.is_autocast_enabled()


def test_compile_checkpoint_loads_on_cpu_without_compile(imm, tmp_path, monkeypatch):
    """--compile trains through torch.compile; the saved weights are the original module's.

    The test uses the aot_eager backend (dynamo + AOTAutograd, the same OptimizedModule wrapper whose
    `_orig_mod.` names would leak into a naive state_dict) because inductor's C++ build takes about a
    minute on a 2-core machine; `imm train --compile` uses inductor.
    """
    monkeypatch.setenv("IMM_COMPILE_BACKEND", "aot_eager")
    run = tmp_path / "c"
    r = imm("train", *TINY, "--iters", "2", "--compile", "--out", str(run))
    assert r.code == 0, r.stderr
    assert json.loads((run / runs.CONFIG).read_text())["train"]["compile"] is True
    assert not any("_orig_mod" in k for k in load_file(run / runs.WEIGHTS))
    model, _ = runs.load_run(run, "cpu")  # plain module, no compile
    assert type(model).__name__ == "GPT"
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        out = model(x, x, state=model.init_state(1, "cpu"))
    assert torch.isfinite(out.loss)
    # and the run resumes without --compile
    r = imm("train", "--resume", str(run), "--iters", "3", "--no-compile")
    assert r.code == 0, r.stderr


def test_compile_that_cannot_work_is_one_line(imm, tmp_path, monkeypatch):
    monkeypatch.setenv("IMM_COMPILE_BACKEND", "no-such-backend")
    r = imm("train", *TINY, "--iters", "1", "--compile", "--out", str(tmp_path / "c"))
    assert r.code in (1, 2)
    assert len(r.err_lines) == 1 and "--compile" in r.err_lines[0] and "Traceback" not in r.stderr, r.stderr
