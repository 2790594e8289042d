"""One table of bad inputs across the subcommands: each gives exit code 2, one line, no traceback,
and leaves every file as it was.

To add a case, append `Case(id, setup)` to CASES: `setup(ctx)` prepares files under `ctx.tmp` and
returns the argv (without `imm`). A case whose subcommand is not registered yet is skipped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY, run_imm, snapshot
from imm_cli.config import LEGACY_DEFAULTS, MemoryConfig, ModelConfig, TrainConfig

MARKER = "PWNED_MARKER"


@dataclass
class Ctx:
    tmp: Path
    source_run: Path

    def file(self, name: str, data: bytes | str) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(p)

    def dir(self, name: str, *files: str) -> str:
        p = self.tmp / name
        p.mkdir(parents=True, exist_ok=True)
        for f in files:
            (p / f).write_text("not a run\n")
        return str(p)

    def run(self, name: str = "run") -> Path:
        """A copy of the tiny trained run (episodic, 8 slots, 2 steps), free to damage."""
        dst = self.tmp / name
        shutil.copytree(self.source_run, dst)
        return dst

    @property
    def out(self) -> str:
        return str(self.tmp / "out")

    def dangling(self, name: str = "dangling") -> str:
        """A symbolic link to nothing."""
        p = self.tmp / name
        p.symlink_to(self.tmp / "nowhere" / "at-all")
        return str(p)

    @property
    def facts(self) -> str:
        return self.file("facts.txt", "Zorblat Quintus was born in 1872 in Lisbon.\nThe capital of Mars is Olympus City.\n")


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]
    skip_if: Callable[[], str | None] = lambda: None  # a reason to skip on this machine, or None
    known_bug: str | None = None  # a bug found by this case and not fixed yet (owner outside this file)
    expect: tuple[str, ...] = ()  # words the one error line must hold
    absent: tuple[str, ...] = ()  # words it must not hold (e.g. a flag the user did not pass)

    @property
    def command(self) -> str:
        return self.id.split(":", 1)[0]


def _not_root() -> str | None:
    return "running as root: chmod does not stop root writing (the under-a-file case covers unwritable --out)" \
        if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def _no_cuda() -> str | None:
    return "this machine has CUDA" if torch.cuda.is_available() else None


def train(ctx: Ctx, *args: str, out: bool = True) -> list[str]:
    return ["train", *TINY, "--iters", "2", *(["--out", ctx.out] if out else []), *args]


# --- damaged run folders ---------------------------------------------------------------------------
def _rewrite_weights(run: Path, change: Callable[[dict], dict]) -> Path:
    path = run / "model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format_version": "1", "step": "2"})
    return run


def _future_weights(run: Path) -> Path:
    path = run / "model.safetensors"
    save_file(load_file(path), path, metadata={"format_version": "99", "step": "2"})
    return run


def _damage(ctx: Ctx, name: str, data: bytes | Callable[[bytes], bytes]) -> Path:
    run = ctx.run()
    p = run / name
    p.write_bytes(data(p.read_bytes()) if callable(data) else data)
    return run


def _config(ctx: Ctx, change: Callable[[dict], None]) -> Path:
    run = ctx.run()
    cfg = json.loads((run / "config.json").read_text())
    change(cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


class _RunsCode:
    """Unpickling this would create the marker file: proof that the loader runs no code."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def __reduce__(self):
        return (pathlib.Path.touch, (self.where,))


def pickled_code_state(ctx: Ctx) -> Path:
    run = ctx.run()
    state = torch.load(run / "train_state.pt", weights_only=True)
    state["extra"] = _RunsCode(ctx.tmp / MARKER)
    buf = io.BytesIO()
    torch.save(state, buf)
    (run / "train_state.pt").write_bytes(buf.getvalue())
    return run


def resume(run: Path | str, *args: str) -> list[str]:
    return ["train", "--resume", str(run), "--iters", "4", *args]


def _set(d: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


CASES: list[Case] = [
    # --- train: data files
    Case("train:data-missing", lambda c: train(c, "--data", str(c.tmp / "nope.txt"))),
    # a folder no process may create there (as root too: permission bits do not tell): refused before any work
    Case("train:out-in-proc", lambda c: train(c, "--out", "/proc/imm-run", out=False), expect=("cannot be created",),
         skip_if=lambda: None if os.path.isdir("/proc/self") else "no /proc on this system"),
    Case("train:data-empty", lambda c: train(c, "--data", c.file("empty.txt", b""))),
    Case("train:data-binary", lambda c: train(c, "--data", c.file("bin.txt", b"hello\x00world" * 500))),
    Case("train:data-not-utf8", lambda c: train(c, "--data", c.file("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 2000))),
    Case("train:data-directory", lambda c: train(c, "--data", c.dir("somedir"))),
    Case("train:data-too-small", lambda c: train(c, "--data", c.file("small.txt", "To be or not to be.\n"))),
    # --- train: output folder
    Case("train:out-under-a-file", lambda c: train(c, "--out", c.file("plain.txt", "x") + "/run", out=False)),
    Case("train:out-is-a-file", lambda c: train(c, "--out", c.file("plain.txt", "x"), out=False)),
    Case("train:out-unwritable", lambda c: (os.chmod(c.dir("locked"), 0o500), train(c, "--out", str(c.tmp / "locked" / "run"), out=False))[1],
         skip_if=_not_root),
    Case("train:out-holds-a-run", lambda c: train(c, "--out", str(c.run()), out=False)),
    Case("train:out-not-empty", lambda c: train(c, "--out", c.dir("busy", "notes.txt"), out=False)),
    # --- train: numbers out of range, flags that do not fit together
    Case("train:slots-negative", lambda c: train(c, "--slots", "-1")),
    Case("train:block-size-0", lambda c: train(c, "--block-size", "0")),
    Case("train:iters-0", lambda c: train(c, "--iters", "0")),
    Case("train:memory-temp-0", lambda c: train(c, "--memory-temp", "0")),
    Case("train:memory-lr-2", lambda c: train(c, "--memory-lr", "2")),
    Case("train:memory-key-dim-0", lambda c: train(c, "--memory-key-dim", "0")),
    Case("train:memory-knn-lm-1", lambda c: train(c, "--memory-knn-lm", "1"), expect=("--memory-knn-lm",)),
    Case("train:memory-drop-1", lambda c: train(c, "--memory-drop", "1"), expect=("--memory-drop",)),
    Case("train:memory-knn-exact-1", lambda c: train(c, "--memory-knn-exact", "1"), expect=("--memory-knn-exact",)),
    Case("train:memory-far-weight-negative", lambda c: train(c, "--memory-far-weight", "-0.1"), expect=("--memory-far-weight",)),
    Case("train:memory-far-bytes-too-many", lambda c: train(c, "--memory-far-bytes", "300"), expect=("--memory-far-bytes",)),
    Case("train:memory-value-dim-negative", lambda c: train(c, "--memory-value-dim", "-1")),
    Case("train:heads-not-dividing-embd", lambda c: train(c, "--heads", "3", "--embd", "32")),
    Case("train:lr-0", lambda c: train(c, "--lr", "0")),
    Case("train:curriculum-1.5", lambda c: train(c, "--curriculum", "1.5")),
    Case("train:batch-not-whole-episodes", lambda c: train(c, "--batch-size", "6")),
    Case("train:device-cuda-missing", lambda c: train(c, "--device", "cuda"), skip_if=_no_cuda),
    # --- train: usage errors
    Case("train:unknown-flag", lambda c: train(c, "--frobnicate", "3")),
    Case("train:bad-enum-memory", lambda c: train(c, "--memory", "lstm")),
    Case("train:bad-enum-device", lambda c: train(c, "--device", "tpu")),
    Case("train:not-a-number", lambda c: train(c, "--iters", "ten")),
    Case("train:flag-without-value", lambda c: [*train(c), "--iters"]),
    Case("train:extra-argument", lambda c: [*train(c), "surplus"]),
    Case("unknown-command:frob", lambda c: ["frob", "--run", str(c.tmp)]),
    # --- train --resume: the folder
    Case("train:resume-missing", lambda c: resume(c.tmp / "no-such-run")),
    Case("train:resume-not-a-run", lambda c: resume(c.dir("notrun", "readme.txt"))),
    Case("train:resume-a-file", lambda c: resume(c.file("plain.txt", "x"))),
    Case("train:resume-disagreeing-slots", lambda c: resume(c.run(), "--slots", "4")),
    Case("train:resume-disagreeing-memory", lambda c: resume(c.run(), "--memory", "linformer")),
    Case("train:resume-disagreeing-block", lambda c: resume(c.run(), "--block-size", "64")),
    Case("train:resume-disagreeing-value-dim", lambda c: resume(c.run(), "--memory-value-dim", "8")),
    Case("train:resume-other-out", lambda c: resume(c.run(), "--out", str(c.tmp / "elsewhere"))),
    Case("train:resume-nothing-left", lambda c: ["train", "--resume", str(c.run()), "--iters", "2"]),
    # --- train --resume: damaged files
    Case("train:weights-empty", lambda c: resume(_damage(c, "model.safetensors", b""))),
    Case("train:weights-truncated", lambda c: resume(_damage(c, "model.safetensors", lambda b: b[: len(b) // 2]))),
    Case("train:weights-garbage", lambda c: resume(_damage(c, "model.safetensors", os.urandom(4096)))),
    Case("train:weights-wrong-shape", lambda c: resume(_rewrite_weights(c.run(), lambda sd: {**sd, "wte.weight": torch.zeros(256, 16)}))),
    Case("train:weights-missing-key", lambda c: resume(_rewrite_weights(c.run(), lambda sd: {k: v for k, v in sd.items() if k != "ln_f.weight"}))),
    Case("train:weights-nan", lambda c: resume(_rewrite_weights(c.run(), lambda sd: {**sd, "ln_f.weight": sd["ln_f.weight"] * float("nan")}))),
    Case("train:weights-missing", lambda c: resume((lambda r: ((r / "model.safetensors").unlink(), r)[1])(c.run()))),
    Case("train:config-garbage", lambda c: resume(_damage(c, "config.json", b"{\"format_version\": 1, \"model\": {"))),
    Case("train:config-not-utf8", lambda c: resume(_damage(c, "config.json", b"\xff\xfe{}"))),
    Case("train:config-future-version", lambda c: resume(_config(c, lambda d: _set(d, "format_version", 99)))),
    Case("train:config-wrong-type", lambda c: resume(_config(c, lambda d: _set(d, "model.n_embd", 32.5)))),
    Case("train:config-bad-value", lambda c: resume(_config(c, lambda d: _set(d, "model.memory.kind", "lstm")))),
    Case("train:config-missing", lambda c: resume((lambda r: ((r / "config.json").unlink(), r)[1])(c.run()))),
    Case("train:state-pickled-code", lambda c: resume(pickled_code_state(c))),
    Case("train:state-garbage", lambda c: resume(_damage(c, "train_state.pt", os.urandom(2048)))),
    Case("train:state-truncated", lambda c: resume(_damage(c, "train_state.pt", lambda b: b[: len(b) // 3]))),
    Case("train:state-wrong-structure", lambda c: resume(_damage(c, "train_state.pt", lambda b: _torch_bytes({"step": "two", "model": {}, "optimizer": {}})))),
    Case("train:state-optimizer-mismatch", lambda c: resume(_damage(c, "train_state.pt", _bad_optimizer))),
    Case("train:state-rng-garbage", lambda c: resume(_damage(c, "train_state.pt", lambda b: _edit_state(b, lambda s: s.update(torch_rng=torch.zeros(3, dtype=torch.uint8)))))),
    Case("train:weights-wrong-dtype", lambda c: resume(_rewrite_weights(c.run(), lambda sd: {**sd, "ln_f.weight": sd["ln_f.weight"].half()}))),
    Case("train:weights-future-version", lambda c: resume(_future_weights(c.run()))),
    Case("train:resume-data-gone", lambda c: resume(_config(c, lambda d: _set(d, "train.data", str(c.tmp / "moved.txt"))))),
    Case("train:state-missing", lambda c: resume((lambda r: ((r / "train_state.pt").unlink(), r)[1])(c.run()))),
    # --- issue 13: the last tracebacks, incomplete configs, data identity, damaged logs
    Case("train:state-raw-pickle", lambda c: resume(_damage(c, "train_state.pt", pickle.dumps({"step": 1}, protocol=4)))),
    Case("train:resume-no-train-section", lambda c: resume(_config(c, lambda d: d.pop("train"))), expect=("'train'",)),
    Case("train:resume-train-a-list", lambda c: resume(_config(c, lambda d: _set(d, "train", [1, 2])))),
    Case("train:resume-no-memory-section", lambda c: resume(_config(c, lambda d: d["model"].pop("memory"))), expect=("model.memory",)),
    Case("train:resume-data-a-number", lambda c: resume(_config(c, lambda d: _set(d, "train.data", 5)))),
    Case("train:resume-eval-batches-0", lambda c: resume(_config(c, lambda d: _set(d, "train.eval_batches", 0))), expect=("eval_batches",)),
    Case("train:resume-eval-batches-1e12", lambda c: resume(_config(c, lambda d: _set(d, "train.eval_batches", 10**12))), expect=("eval_batches",)),
    Case("train:resume-seed-2**64", lambda c: resume(_config(c, lambda d: _set(d, "train.seed", 2**64)))),
    Case("train:resume-huge-model", lambda c: resume(_config(c, _huge_model)), expect=("GiB",)),
    Case("train:resume-data-changed", lambda c: resume(_config(c, lambda d: _set(d, "data.sha256", "0" * 64))), expect=("sha256",)),
    Case("train:resume-data-section-damaged", lambda c: resume(_config(c, lambda d: _set(d, "data", [1])))),
    Case("train:resume-metrics-a-folder", lambda c: resume(_with(c.run(), lambda r: (r / "metrics.jsonl").unlink() or (r / "metrics.jsonl").mkdir())),
         expect=("metrics.jsonl",)),
    Case("train:resume-lossplot-a-folder", lambda c: resume(_with(c.run(), lambda r: (r / "loss.png").unlink() or (r / "loss.png").mkdir()))),
    Case("train:resume-read-only", lambda c: resume(_with(c.run(), lambda r: os.chmod(r, 0o500))), skip_if=_not_root),
    Case("train:seed-negative", lambda c: train(c, "--seed", "-1")),
    Case("train:seed-2**64", lambda c: train(c, "--seed", str(2**64))),
    Case("train:huge-model", lambda c: train(c, "--layers", "64", "--heads", "64", "--embd", "8192"), expect=("GiB",)),
    Case("train:device-cuda-7", lambda c: train(c, "--device", "cuda:7"), skip_if=_no_cuda),
    Case("train:out-dangling-symlink", lambda c: train(c, "--out", c.dangling(), out=False), expect=("symbolic link",)),
    Case("train:out-under-a-dangling-symlink", lambda c: train(c, "--out", c.dangling() + "/run", out=False)),
    Case("train:out-name-too-long", lambda c: train(c, "--out", str(c.tmp / ("x" * 300)), out=False)),
    Case("train:data-relative-missing", lambda c: train(c, "--data", "no/such/relative.txt")),
]


def _with(run: Path, change) -> Path:
    change(run)
    return run


def _huge_model(d: dict) -> None:
    d["model"].update(n_layer=64, n_head=64, n_embd=8192)
    d["model"]["memory"]["layer"] = -2


def _all_fields():
    """(section, field, dataclass field) of every field config.json holds."""
    for section, cls in (("train", TrainConfig), ("model", ModelConfig), ("model.memory", MemoryConfig)):
        for f in dataclasses.fields(cls):
            if f.name != "memory":
                yield section, f.name, f


def _drop(path: str):
    def change(d: dict) -> None:
        keys = path.split(".")
        for k in keys[:-1]:
            d = d[k]
        d.pop(keys[-1])
    return change


def _numeric(f) -> bool:
    return any(t in str(f.type) for t in ("int", "float"))


# every field of every section: missing (on resume), of the wrong type, not finite or out of any range
for _section, _name, _f in _all_fields():
    _path = f"{_section}.{_name}"
    if not (_section == "model.memory" and _name in LEGACY_DEFAULTS[MemoryConfig]):  # documented: older configs lacked them
        CASES.append(Case(f"train:resume-missing-{_path}", lambda c, p=_path: resume(_config(c, _drop(p))), expect=(_path,)))
    CASES.append(Case(f"train:resume-list-{_path}", lambda c, p=_path: resume(_config(c, lambda d: _set(d, p, [1]))), expect=(_path,)))
    if _numeric(_f):
        CASES.append(Case(f"train:resume-nan-{_path}", lambda c, p=_path: resume(_config(c, lambda d: _set(d, p, float("nan"))))))
        CASES.append(Case(f"train:resume-huge-{_path}", lambda c, p=_path: resume(_config(c, lambda d: _set(d, p, 10**30)))))


def _edit_state(data: bytes, change) -> bytes:
    state = torch.load(io.BytesIO(data), weights_only=True)
    change(state)
    return _torch_bytes(state)


def _bad_optimizer(data: bytes) -> bytes:
    def change(state):
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(3, 3)
    return _edit_state(data, change)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- the other subcommands: every one that reads a run folder (and facts) --------------------------
RUN_COMMANDS = ("store", "usage", "recall", "needle")
FACT_COMMANDS = ("recall", "needle")


def _with_run(cmd: str, c: Ctx, run: Path | str, *args: str) -> list[str]:
    facts = ["--facts", c.facts] if cmd in FACT_COMMANDS else []
    return [cmd, "--run", str(run), *facts, *args]


# store.check_out (shared by store and usage) asks for write permission on the nearest existing
# ancestor, a regular file here, which root may "write": the command runs and then fails in mkdir
# (NotADirectoryError, exit 1). imm_cli.cli.common.check_out_folder refuses it up front.
OUT_UNDER_A_FILE: dict[str, str] = {}  # commands with a known bug here (none now)

for _cmd in RUN_COMMANDS:
    CASES += [
        Case(f"{_cmd}:run-missing", lambda c, m=_cmd: _with_run(m, c, c.tmp / "no-such-run")),
        Case(f"{_cmd}:run-not-a-run", lambda c, m=_cmd: _with_run(m, c, c.dir("notrun", "readme.txt"))),
        Case(f"{_cmd}:weights-garbage", lambda c, m=_cmd: _with_run(m, c, _damage(c, "model.safetensors", os.urandom(4096)))),
        Case(f"{_cmd}:weights-wrong-shape", lambda c, m=_cmd: _with_run(m, c, _rewrite_weights(c.run(), lambda sd: {**sd, "wpe.weight": torch.zeros(7, 32)}))),
        Case(f"{_cmd}:config-future-version", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "format_version", 99)))),
        Case(f"{_cmd}:unknown-flag", lambda c, m=_cmd: [*_with_run(m, c, c.run()), "--frobnicate"]),
        Case(f"{_cmd}:out-under-a-file", lambda c, m=_cmd: _with_run(m, c, c.run(), "--out", c.file("plain.txt", "x") + "/o"),
             known_bug=OUT_UNDER_A_FILE.get(_cmd)),
        Case(f"{_cmd}:out-dangling-symlink", lambda c, m=_cmd: _with_run(m, c, c.run(), "--out", c.dangling()), expect=("symbolic link",)),
        Case(f"{_cmd}:run-a-file", lambda c, m=_cmd: _with_run(m, c, c.file("plain.txt", "x")), absent=("--out",)),
        Case(f"{_cmd}:seed-negative", lambda c, m=_cmd: _with_run(m, c, c.run(), "--seed", "-1")),
        Case(f"{_cmd}:seed-2**64", lambda c, m=_cmd: _with_run(m, c, c.run(), "--seed", str(2**64))),
        Case(f"{_cmd}:config-train-a-list", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "train", [1])))),
        Case(f"{_cmd}:config-data-a-number", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "train.data", 5)))),
        Case(f"{_cmd}:config-eval-batches-0", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "train.eval_batches", 0)))),
        Case(f"{_cmd}:config-missing-n-head", lambda c, m=_cmd: _with_run(m, c, _config(c, _drop("model.n_head"))), expect=("model.n_head",)),
        Case(f"{_cmd}:config-nan-gate-bias", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "model.memory.gate_bias", float("nan"))))),
        Case(f"{_cmd}:huge-model", lambda c, m=_cmd: _with_run(m, c, _config(c, _huge_model)), expect=("GiB",)),
        # an experiment has no --data: the remedy it names is the file back in its place
        Case(f"{_cmd}:data-changed", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "data.sha256", "f" * 64))),
             expect=("sha256", "put the original file back"), absent=("--data",)),
        Case(f"{_cmd}:data-gone", lambda c, m=_cmd: _with_run(m, c, _config(c, lambda d: _set(d, "train.data", str(c.tmp / "moved.txt")))),
             expect=("does not exist", "at that path"), absent=("--data",)),
        Case(f"{_cmd}:out-holds-user-files", lambda c, m=_cmd: _with_run(m, c, c.run(), "--out", c.dir("mine", f"{m}.json")),
             expect=(f"{_cmd}.json", "--force")),
        Case(f"{_cmd}:out-output-is-a-folder", lambda c, m=_cmd: _with_run(m, c, c.run(), "--out", str(Path(c.dir(f"o/{m}.json")).parent)),
             expect=(f"{_cmd}.json",)),
    ]
for _cmd in FACT_COMMANDS:
    CASES += [
        Case(f"{_cmd}:facts-missing", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", str(c.tmp / "nope.txt")],
             expect=("nope.txt does not exist",)),
        Case(f"{_cmd}:facts-empty", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", c.file("f.txt", b"")]),
        Case(f"{_cmd}:facts-binary", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", c.file("f.txt", b"a b c\x00d\n")]),
        Case(f"{_cmd}:facts-not-utf8", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", c.file("f.txt", b"caf\xe9 au lait noir\n")]),
        Case(f"{_cmd}:facts-directory", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", c.dir("fdir")], expect=("directory",)),
        Case(f"{_cmd}:facts-only-comments", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", c.file("f.txt", "# nothing\n\n")]),
        Case(f"{_cmd}:facts-dangling-symlink", lambda c, m=_cmd: [m, "--run", str(c.run()), "--facts", c.dangling()]),
        Case(f"{_cmd}:knn-lm-1", lambda c, m=_cmd: _with_run(m, c, c.run(), "--knn-lm", "1"), expect=("--knn-lm",)),
        Case(f"{_cmd}:knn-lm-negative", lambda c, m=_cmd: _with_run(m, c, c.run(), "--knn-lm", "-0.1"), expect=("--knn-lm",)),
        Case(f"{_cmd}:knn-exact-1", lambda c, m=_cmd: _with_run(m, c, c.run(), "--knn-exact", "1"), expect=("--knn-exact",)),
        Case(f"{_cmd}:far-weight-2", lambda c, m=_cmd: _with_run(m, c, c.run(), "--far-weight", "2"), expect=("--far-weight",)),
        Case(f"{_cmd}:memory-size-0", lambda c, m=_cmd: _with_run(m, c, c.run(), "--memory-size", "0"), expect=("--memory-size",)),
    ]


# numbers out of range and flags that cannot work, per command
CASES += [
    Case("store:sequences-0", lambda c: _with_run("store", c, c.run(), "--sequences", "0")),
    Case("usage:sequences-negative", lambda c: _with_run("usage", c, c.run(), "--sequences", "-5")),
    Case("recall:context-negative", lambda c: _with_run("recall", c, c.run(), "--context", "-1")),
    Case("recall:device-cuda-missing", lambda c: _with_run("recall", c, c.run(), "--device", "cuda"), skip_if=_no_cuda),
    Case("recall:device-unknown", lambda c: _with_run("recall", c, c.run(), "--device", "tpu")),
    Case("needle:depth-2", lambda c: _with_run("needle", c, c.run(), "--depth", "2")),
    Case("needle:trials-0", lambda c: _with_run("needle", c, c.run(), "--trials", "0")),
    Case("needle:placement-twice", lambda c: _with_run("needle", c, c.run(), "--placement", "line,line"), expect=("--placement", "twice")),
    Case("needle:document-empty-item", lambda c: _with_run("needle", c, c.run(), "--document", "4,,8"), expect=("--document", "empty")),
    Case("needle:depth-names-its-flag", lambda c: _with_run("needle", c, c.run(), "--depth", "1.5"), expect=("--depth ",)),
    Case("needle:lengths-not-numbers", lambda c: _with_run("needle", c, c.run(), "--lengths", "64,abc")),
    Case("needle:capacity-0", lambda c: _with_run("needle", c, c.run(), "--capacity", "0")),
    Case("needle:device-cuda-missing", lambda c: _with_run("needle", c, c.run(), "--device", "cuda"), skip_if=_no_cuda),
    Case("needle:trials-1e12", lambda c: _with_run("needle", c, c.run(), "--trials", str(10**12)), expect=("--trials",)),
    Case("needle:capacity-1e12", lambda c: _with_run("needle", c, c.run(), "--capacity", str(10**12))),
    Case("store:sequences-1e12", lambda c: _with_run("store", c, c.run(), "--sequences", str(10**12))),
    Case("recall:device-tpu-on-a-good-run", lambda c: _with_run("recall", c, c.run(), "--device", "tpu:0")),
    Case("compare:facts-missing-even-if-unneeded", lambda c: ["compare", str(c.run()), "--facts", str(c.tmp / "nope.txt"), "--no-run", "--no-speed",
                                                              "--out", c.out], expect=("--facts",)),
    Case("report:config-not-json", lambda c: ["report", str(_damage(c, "config.json", b"{not json"))], expect=("config.json",)),
    Case("report:run-a-file", lambda c: ["report", c.file("plain.txt", "x")], absent=("--out",)),
]

# sweep: every path-like flag and the folder's own files, before anything is trained
SWEEP = ["--layers", "1", "--heads", "2", "--embd", "32", "--batch-size", "8", "--sequences", "5", "--device", "cpu",
         "--iters", "2", "--block-size", "128", "--slots", "4"]


def sweep(c: Ctx, *args: str, out: str | None = None, facts: str | None = None) -> list[str]:
    return ["sweep", *SWEEP, "--facts", facts or str(REPO / "examples" / "facts.txt"), "--out", out or c.out, *args]


CASES += [
    Case("sweep:settings-a-list", lambda c: sweep(c, out=_write(c.tmp / "sw" / "sweep_settings.json", "[1, 2]"))),
    Case("sweep:settings-huge-int", lambda c: sweep(c, out=_write(c.tmp / "sw" / "sweep_settings.json", '{"iters": 1' + "0" * 5000 + "}"))),
    Case("sweep:facts-binary", lambda c: sweep(c, facts=c.file("f.txt", b"a b c\x00d\n"))),
    Case("sweep:facts-not-utf8", lambda c: sweep(c, facts=c.file("f.txt", b"caf\xe9 au lait noir\n"))),
    Case("sweep:facts-dangling-symlink", lambda c: sweep(c, facts=c.dangling())),
    Case("sweep:data-missing", lambda c: sweep(c, "--data", str(c.tmp / "nope.txt"))),
    Case("sweep:out-dangling-symlink", lambda c: sweep(c, out=c.dangling())),
    Case("sweep:out-a-file", lambda c: sweep(c, out=c.file("plain.txt", "x"))),
    Case("sweep:out-holds-user-files", lambda c: sweep(c, out=c.dir("mine", "optimal_config_results.png")), expect=("--force",)),
    Case("sweep:seed-negative", lambda c: sweep(c, "--seed", "-1")),
    Case("sweep:device-tpu", lambda c: sweep(c, "--device", "tpu")),
    Case("sweep:huge-model", lambda c: sweep(c, "--layers", "64", "--heads", "64", "--embd", "8192"), expect=("GiB",)),
]


def _write(path: Path, text: str) -> str:
    """Write `text` at `path` (folders made) and return the folder: a sweep --out holding it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path.parent)


def registered_commands() -> set[str]:
    import typer

    from imm_cli.cli.app import app

    return set(typer.main.get_command(app).commands)


REGISTERED = registered_commands()


def _prepare(case: Case, tmp_path: Path, tiny_run: Path, monkeypatch) -> tuple[list[str], dict]:
    if case.command not in REGISTERED and case.command != "unknown-command":
        pytest.skip(f"`imm {case.command}` is not registered yet")
    reason = case.skip_if()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a default output folder would land here: it must stay empty too
    argv = case.setup(Ctx(work, tiny_run))
    return argv, snapshot(work)


def _check(case: Case, r, work: Path, before: dict) -> None:
    assert r.code == 2, f"{case.id}: exit {r.code}, stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.err_lines) == 1, f"{case.id}: expected one line on stderr, got:\n{r.stderr}"
    assert r.err_lines[0].startswith("error: "), r.err_lines[0]
    assert all(w in r.err_lines[0] for w in case.expect), f"{case.id}: {case.expect} not in {r.err_lines[0]!r}"
    assert not any(w in r.err_lines[0] for w in case.absent), f"{case.id}: {case.absent} in {r.err_lines[0]!r}"
    assert r.stdout == "", f"{case.id}: stdout should be empty, got {r.stdout!r}"
    assert snapshot(work) == before, f"{case.id}: files were written or changed"
    assert not (work / MARKER).exists(), f"{case.id}: code inside a file ran"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, imm, tmp_path, tiny_run, monkeypatch, request):
    if case.known_bug:
        request.applymarker(pytest.mark.xfail(reason=case.known_bug, strict=False))
    argv, before = _prepare(case, tmp_path, tiny_run, monkeypatch)
    r = imm(*argv)
    _check(case, r, tmp_path / "work", before)


def test_every_train_flag_is_declared_once_in_the_flags_table():
    """`imm train`'s flags become configs, and come back from config.json on resume, through config.FLAGS."""
    import typer

    from imm_cli.cli.app import app
    from imm_cli.config import FLAGS

    params = {p.name for p in typer.main.get_command(app).commands["train"].params}
    assert params - set(FLAGS) == {"out", "resume", "json_out"}
    assert set(FLAGS) <= params
    fields = {"model": ModelConfig, "memory": MemoryConfig, "train": TrainConfig}
    for flag, (section, name) in FLAGS.items():
        assert name in {f.name for f in dataclasses.fields(fields[section])}, flag


def test_train_and_sweep_take_their_shared_flags_from_one_declaration():
    """cli/flags.py declares each training flag once: sweep's shared flags carry train's help text
    (plus a note), and their types come from the configs (a list flag is a comma-separated str)."""
    import typer

    from imm_cli.cli.app import app
    from imm_cli.cli.flags import HELP

    commands = typer.main.get_command(app).commands
    train = {p.name: p for p in commands["train"].params}
    sweep = {p.name: p for p in commands["sweep"].params}
    shared = set(train) & set(sweep) & set(HELP) - {"device"}  # sweep's --device runs the needle test too: its own text
    assert {"slots", "memory", "layers", "embd", "batch_size", "iters", "seed", "data", "memory_temp"} <= shared
    for flag in HELP:
        assert train[flag].help.startswith(HELP[flag]), flag
    for flag in shared:
        assert sweep[flag].help.startswith(HELP[flag]), flag
    assert (sweep["slots"].default, train["slots"].default) == ("8", 8)  # swept: a list as text, not an int
    assert sweep["layers"].default == 4 and train["memory"].default.value == "episodic"


def test_table_is_large_enough():
    active = [c for c in CASES if c.command in REGISTERED or c.command == "unknown-command"]
    assert len(active) >= 25
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# The same checks through the installed `imm` script in a fresh process, for a sample of the table
# (a process costs seconds of imports, so not for every case).
SUBPROCESS_SAMPLE = ["train:data-not-utf8", "train:bad-enum-memory", "train:state-pickled-code", "train:state-raw-pickle",
                     "store:out-dangling-symlink", "sweep:settings-a-list"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_SAMPLE], ids=SUBPROCESS_SAMPLE)
def test_bad_input_real_process(case: Case, tmp_path, tiny_run, monkeypatch):
    argv, before = _prepare(case, tmp_path, tiny_run, monkeypatch)
    r = run_imm(argv, cwd=tmp_path / "work")
    _check(case, r, tmp_path / "work", before)


def test_imm_debug_shows_where_an_input_error_was_raised(tmp_path):
    """IMM_DEBUG=1: the traceback of a refused input too, then the same one line and exit code."""
    plain = run_imm(["store", "--run", str(tmp_path / "no-such-run")])
    debug = run_imm(["store", "--run", str(tmp_path / "no-such-run")], IMM_DEBUG="1")
    assert plain.code == debug.code == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == plain.stderr.rstrip().splitlines()[-1]


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from imm_cli.cli.app import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"imm {version('imm')}"


@pytest.mark.parametrize("argv, words", [
    (["train", "--lr", "abc"], "Invalid value for '--lr': not a number"),
    (["train", "--iters", "1.5"], "Invalid value for '--iters': not a whole number"),
    (["train", "--memory", "foo"], "'foo' is not one of 'episodic'"),
])
def test_flag_type_errors_read_as_the_tools_own(argv, words, capsys, monkeypatch):
    """typer's validation messages come from pydantic; the one line says the same in plain words."""
    from imm_cli.cli.app import main

    monkeypatch.setenv("IMM_NO_EXIT", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Input should" not in err and "Value error" not in err, err
