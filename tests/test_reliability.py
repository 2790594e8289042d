"""Nothing a researcher does may lose a run, corrupt a checkpoint, or run code hidden in a file.

- SIGKILL at every moment of a checkpoint (and at random moments): the last checkpoint always loads,
  leftovers are ignored and cleaned, and the run resumes;
- k steps + Ctrl-C + `--resume` gives bitwise the weights of N steps straight (CPU), with a clean log;
- a training state whose pickle would run code is refused and the code does not run;
- Ctrl-C (SIGINT) on a real `imm train`: exit 130, how to resume, and `--resume` goes on from there;
  a second Ctrl-C during the save exits at once and leaves the previous checkpoint whole;
- a non-finite loss or gradient stops training with the step, exit 1, last good checkpoint intact.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, clean_env, imm_command, tiny_configs
from imm_cli import runs
from imm_cli import train as train_mod
from imm_cli.errors import InputError


def weights_equal(a: Path, b: Path) -> bool:
    sa, sb = load_file(a / runs.WEIGHTS), load_file(b / runs.WEIGHTS)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in runs.read_metrics(run) if "loss" in r and "event" not in r]


def stop_at(step: int, sig: int = signal.SIGINT):
    """An on_event hook that presses Ctrl-C (a real SIGINT to this process, or SIGTERM) once `step` is done."""
    def hook(e: dict) -> None:
        if e["type"] == "step" and e["step"] == step:
            os.kill(os.getpid(), sig)
    return hook


# --- exact resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("memory,sig", [("episodic", signal.SIGINT),
                                        pytest.param("linformer", signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["episodic-SIGINT", "linformer-SIGTERM"])
def test_resume_is_bitwise_identical(memory, sig, tmp_path, imm):
    n, k = 6, 3
    model_cfg, cfg = tiny_configs(memory, iters=n, eval_every=2, save_every=100)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_mod.train(model_cfg, cfg, straight)

    first = train_mod.train(model_cfg, cfg, resumed, on_event=stop_at(k, sig))
    assert first.interrupted and first.step == k
    assert runs.load_train_state(resumed)["step"] == k
    # a run killed later than its checkpoint leaves rows past it, and maybe a torn last line
    runs.append_metrics(resumed, [{"step": k + 1, "loss": 9.0}, {"step": k + 2, "loss": 9.0}])
    with open(resumed / runs.METRICS, "a") as f:
        f.write('{"step": 6, "lo')

    r = imm("train", "--resume", str(resumed))
    assert r.code == 0, r.stderr

    assert weights_equal(straight, resumed)
    sa, sb = runs.load_train_state(straight), runs.load_train_state(resumed)
    assert sa["step"] == sb["step"] == n
    assert all(torch.equal(sa["model"][key], sb["model"][key]) for key in sa["model"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[key], pb[key]) for key in pa)
    assert torch.equal(sa["torch_rng"], sb["torch_rng"]) and torch.equal(sa["batches"]["gen"], sb["batches"]["gen"])
    # the log holds every step once, and the resumed steps logged exactly the straight run's losses
    assert train_steps(resumed) == list(range(1, n + 1))
    loss = lambda run: {r["step"]: r["loss"] for r in runs.read_metrics(run)}
    assert loss(resumed) == loss(straight)
    assert json.loads((resumed / runs.CONFIG).read_text())["summary"]["step"] == n


def test_resume_may_change_iterations_and_intervals_only(tmp_path, imm):
    model_cfg, cfg = tiny_configs(iters=2)
    run = tmp_path / "run"
    train_mod.train(model_cfg, cfg, run)
    r = imm("train", "--resume", str(run), "--iters", "3", "--save-every", "1", "--eval-every", "5", "--heads", "2")
    assert r.code == 0, r.stderr  # --heads 2 agrees with the run, so it is allowed
    assert train_steps(run) == [1, 2, 3]
    r = imm("train", "--resume", str(run), "--iters", "4", "--lr", "0.01")
    assert r.code == 2 and "--lr 0.01 disagrees" in r.stderr and len(r.err_lines) == 1


# --- code hidden in a training state ---------------------------------------------------------------
class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_in_train_state_is_refused_and_never_runs(run_copy, tmp_path, imm):
    marker = tmp_path / "MARKER"
    state = torch.load(run_copy / runs.TRAIN_STATE, weights_only=True)
    state["optimizer"]["note"] = RunsCode(marker)
    buf = io.BytesIO()
    torch.save(state, buf)
    (run_copy / runs.TRAIN_STATE).write_bytes(buf.getvalue())

    # the proof is sound: an unsafe load of this very file does create the marker
    probe = tmp_path / "probe.pt"
    probe.write_bytes(buf.getvalue())
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(InputError, match="train_state.pt refused: it carries a pickled object"):
        runs.load_train_state(run_copy)
    assert not marker.exists()
    r = imm("train", "--resume", str(run_copy), "--iters", "5")
    assert r.code == 2 and len(r.err_lines) == 1
    assert str(run_copy / runs.TRAIN_STATE) in r.stderr and "could run code" in r.stderr
    assert not marker.exists()


# --- non-finite values -----------------------------------------------------------------------------
class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_nonfinite_stops_with_the_step_and_keeps_the_last_checkpoint(what, tmp_path, imm, monkeypatch):
    real = train_mod.episode_loss
    calls = {"n": 0}

    def poisoned(model, x, y):
        loss, parts = real(model, x, y)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third step
                loss = loss * float("nan") if what == "loss" else InfGrad.apply(loss)
        return loss, parts

    monkeypatch.setattr(train_mod, "episode_loss", poisoned)
    run = tmp_path / "run"
    r = imm("train", *TINY, "--iters", "5", "--save-every", "2", "--out", str(run))
    assert r.code == 1, r.stderr
    assert len([ln for ln in r.err_lines if ln.startswith("error:")]) == 1 and "Traceback" not in r.stderr
    assert f"non-finite {what}" in r.stderr and "at step 3" in r.stderr and "(step 2)" in r.stderr
    # the checkpoint of step 2 is whole and consistent: weights, training state and config
    state = runs.load_train_state(run)
    assert state["step"] == 2
    model, cfg = runs.load_run(run)
    assert cfg["summary"]["step"] == 2
    sd = load_file(run / runs.WEIGHTS)
    assert all(torch.equal(sd[key], state["model"][key]) for key in sd)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(row.get("event") == "nonfinite" and row["step"] == 3 for row in runs.read_metrics(run))
    # and the run goes on from there once the cause is gone
    monkeypatch.setattr(train_mod, "episode_loss", real)
    assert imm("train", "--resume", str(run)).code == 0
    assert train_steps(run) == [1, 2, 3, 4, 5]


# --- Ctrl-C on a real process ----------------------------------------------------------------------
class Proc:
    """A real `imm` process whose stderr is collected line by line as it comes."""

    def __init__(self, argv: list[str], cwd: Path, **env: str) -> None:
        self.p = subprocess.Popen(argv, cwd=cwd, env=clean_env(**env), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.lines.append(line)

    def wait_for(self, cond, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if self.p.poll() is not None:
                raise AssertionError(f"process ended early ({self.p.returncode}):\n{''.join(self.lines)}")
            if time.monotonic() > end:
                self.p.kill()
                raise AssertionError(f"timed out:\n{''.join(self.lines)}")
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
        self.t.join(5)
        self.p.stdout.close()
        return self.p.returncode, "".join(self.lines)


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_resume_goes_on(tmp_path, imm):
    run = tmp_path / "run"
    proc = Proc(imm_command("train", *TINY, "--iters", "100000", "--save-every", "100000", "--eval-every", "100000",
                            "--out", str(run)), cwd=tmp_path)
    proc.wait_for(lambda: len(train_steps(run)) >= 3)
    proc.p.send_signal(signal.SIGINT)
    code, err = proc.finish()
    assert code == 130, err
    assert f"Resume with: imm train --resume {run}" in err and "Traceback" not in err
    k = runs.load_train_state(run)["step"]
    assert k >= 3
    assert json.loads((run / runs.CONFIG).read_text())["summary"]["step"] == k
    assert train_steps(run) == list(range(1, k + 1))
    runs.load_run(run)
    assert not list(run.glob(runs.TMP_PREFIX + "*"))

    r = imm("train", "--resume", str(run), "--iters", str(k + 2))
    assert r.code == 0, r.stderr
    assert runs.load_train_state(run)["step"] == k + 2
    assert train_steps(run) == list(range(1, k + 3))


# Saves that pause inside os.fsync (announcing "@SAVING" on stderr) once training has begun, so that
# a signal can be sent while a checkpoint is being written.
SLOW_SAVE = """
import os, sys, time
from pathlib import Path
real_fsync = os.fsync
def slow_fsync(fd):
    if (Path(sys.argv[-1]) / "metrics.jsonl").exists():
        sys.stderr.write("@SAVING\\n"); sys.stderr.flush()
        time.sleep(30)
    real_fsync(fd)
os.fsync = slow_fsync
sys.argv = ["imm", *sys.argv[1:]]
from imm_cli.cli.app import main
main()
"""


@pytest.mark.slow
def test_second_ctrl_c_during_the_save_exits_at_once_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = Proc([sys.executable, "-c", SLOW_SAVE, "train", *TINY, "--iters", "100000", "--save-every", "100000",
                 "--eval-every", "100000", "--out", str(run)], cwd=tmp_path)
    proc.wait_for(lambda: len(train_steps(run)) >= 2)
    proc.p.send_signal(signal.SIGINT)  # first: finish the step, then save...
    proc.wait_for(lambda: any("@SAVING" in ln for ln in proc.lines))
    t = time.monotonic()
    proc.p.send_signal(signal.SIGINT)  # ...second, while saving: leave now
    code, err = proc.finish()
    assert code == 130 and time.monotonic() - t < 10, err
    assert "exiting at once without saving" in err
    assert runs.load_train_state(run)["step"] == 0  # the final save never replaced the step-0 checkpoint
    runs.load_run(run)
    assert list(run.glob(runs.TMP_PREFIX + "*")), "the interrupted save should have left its temporary file"


# --- SIGKILL while saving --------------------------------------------------------------------------
# One process imports everything once, then forks a child per kill: the child trains with
# --save-every 1 and SIGKILLs itself at the n-th event of the save path (a torn temporary file,
# before/after each fsync, before/after each os.replace), or the parent kills it after a random
# delay. The parent then loads what is left and resumes it in another child; a JSON report follows.
HARNESS = r"""
import json, os, random, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from imm_cli import runs
from imm_cli.cli.app import main
from imm_cli.data import load_default_corpus
from imm_cli.errors import InputError
import torch._dynamo  # imported by the first optimizer: import it once here
import matplotlib.pyplot  # and the loss plot's
import imm_cli.plots

spec = json.loads(sys.argv[1])
root = Path(spec["root"])
os.environ["IMM_NO_EXIT"] = "1"
load_default_corpus()
train_argv = spec["argv"]


def child_train(out, target):
    count = [0]
    real_fsync, real_replace, real_write = os.fsync, os.replace, Path.write_bytes
    def event(kind, path=None, data=None):
        if count[0] == target:
            if kind == "torn":  # the temporary file holds half its bytes
                real_write(Path(path), data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    real_save_file = runs.save_file
    def fsync(fd):
        event("fsync"); real_fsync(fd)
    def replace(a, b):
        event("replace"); real_replace(a, b); event("replaced")
    def write_bytes(self, data):
        if self.name.startswith(runs.TMP_PREFIX):
            event("torn", self, data)
        return real_write(self, data)
    def save_file(sd, path, metadata=None):
        real_save_file(sd, path, metadata=metadata)
        event("torn", path, Path(path).read_bytes())
    if target >= 0:
        os.fsync, os.replace, Path.write_bytes, runs.save_file = fsync, replace, write_bytes, save_file
    code = main([*train_argv, "--out", str(out)])
    os._exit(200 + code)  # reaching the end means the kill point was never hit


def fork(fn, *args):
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(99)
    return pid


def inspect(out):
    res = {"exists": out.exists(), "tmp_files": sorted(p.name for p in out.glob(runs.TMP_PREFIX + "*")) if out.exists() else []}
    for what, fn in (("run", lambda: runs.load_run(out)[1]["summary"].get("step")),
                     ("state", lambda: runs.load_train_state(out)["step"])):
        try:
            res[what] = {"ok": fn()}
        except InputError as e:
            res[what] = {"refused": str(e)}
        except Exception as e:
            res[what] = {"crash": repr(e)}
    return res


def child_resume(out):
    os._exit(main(["train", "--resume", str(out), "--iters", str(spec["iters"])]))


report = []
for i, kill in enumerate(spec["kills"]):
    out = root / f"k{i}"
    t0 = time.time()
    if kill["mode"] == "event":
        pid = fork(child_train, out, kill["at"])
        _, status = os.waitpid(pid, 0)
    else:
        pid = fork(child_train, out, -1)
        time.sleep(kill["at"])
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    t_kill = time.time() - t0
    entry = {"kill": kill, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
             "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "after_kill": inspect(out)}
    if out.exists() and kill["resume"]:
        pid = fork(child_resume, out)
        _, status = os.waitpid(pid, 0)
        entry["resume_exit"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        entry["after_resume"] = inspect(out)
    entry["seconds"] = [round(t_kill, 2), round(time.time() - t0, 2)]
    report.append(entry)
print(json.dumps(report))
"""

EVENTS_PER_CHECKPOINT = 15  # 3 files x (torn temp file, fsync file, before replace, after replace, fsync folder)


@pytest.mark.slow
def test_sigkill_while_saving_always_leaves_a_loadable_checkpoint(tmp_path):
    iters = 2
    # Per file of a checkpoint the events are: 0 torn temporary file, 1 fsync, 2 before os.replace,
    # 3 after it, 4 folder fsync. Kill at the three distinct on-disk states of each file (torn temp,
    # whole temp not yet in place, in place) while saving step 1 (the step-0 checkpoint is whole),
    # twice while saving step 0 (nothing complete yet), and at random moments. Resuming costs a
    # second, so only some resume (with leftovers to clean, inconsistent files, nothing to resume).
    second = EVENTS_PER_CHECKPOINT
    kills = [{"mode": "event", "at": second + 5 * f + e, "resume": (f, e) in ((0, 0), (1, 2))}
             for f in range(3) for e in (0, 2, 3)]
    kills += [{"mode": "event", "at": e, "resume": True} for e in (0, 7)]
    rnd = __import__("random").Random(5)
    kills += [{"mode": "delay", "at": round(rnd.uniform(0.05, 1.0), 3), "resume": i == 0} for i in range(2)]
    argv = ["train", *TINY, "--iters", str(iters), "--save-every", "1", "--eval-every", "100"]
    spec = {"root": str(tmp_path), "argv": argv, "kills": kills, "iters": iters}
    p = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(spec)], capture_output=True, text=True,
                       env=clean_env(), timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(report) == len(kills)

    saw_leftovers = resumed_with_leftovers = False
    for entry in report:
        kill, after = entry["kill"], entry["after_kill"]
        where = json.dumps(kill)
        for what in ("run", "state"):
            assert "crash" not in after[what], f"{where}: {after}"
        if kill["mode"] == "event":
            assert entry["signal"] == signal.SIGKILL, f"{where}: the kill point was never reached: {entry}"
        if not after["exists"]:
            assert kill["mode"] == "delay"
            continue  # killed before the run folder was made: nothing to load, nothing lost
        saw_leftovers |= bool(after["tmp_files"])
        complete = "ok" in after["run"]
        if complete:  # config.json is written last: a run that loads has its training state too
            assert "ok" in after["state"], f"{where}: {after}"
        else:  # no checkpoint was ever completed: refused cleanly (one line), never a crash
            assert "refused" in after["run"] and not (kill["mode"] == "event" and kill["at"] >= second), where
        if kill["mode"] == "event" and kill["at"] >= second:
            # killed while saving step 1: the step-0 checkpoint (or the whole step-1 one) loads
            assert after["run"]["ok"] in (0, 1) and after["state"]["ok"] in (0, 1), f"{where}: {after}"
        if "resume_exit" not in entry:
            continue
        if not complete or after["state"]["ok"] == iters:  # nothing to resume from / nothing left to do
            assert entry["resume_exit"] == 2, f"{where}: {entry}"
            continue
        assert entry["resume_exit"] == 0, f"{where}: {entry}"
        final = entry["after_resume"]
        assert final["run"] == {"ok": iters} and final["state"] == {"ok": iters}, f"{where}: {final}"
        assert final["tmp_files"] == [], f"{where}: leftovers were not cleaned: {final}"
        resumed_with_leftovers |= bool(after["tmp_files"])
    assert saw_leftovers and resumed_with_leftovers, "no kill left a temporary file: the kill points missed the saves"
