"""Nothing a researcher does may lose a run, corrupt a checkpoint, or run code hidden in a file.

- SIGKILL at every moment of a checkpoint (and at random moments): the last checkpoint always loads,
  leftovers are ignored and cleaned, and the run resumes;
- k steps + Ctrl-C + `--resume` gives bitwise the weights of N steps straight (CPU), with a clean log;
- a training state whose pickle would run code is refused and the code does not run;
- Ctrl-C (SIGINT) on a real `imm train`: exit 130, how to resume, and `--resume` goes on from there;
  a second Ctrl-C during the save exits at once and leaves the previous checkpoint whole;
- a non-finite loss or gradient stops training with the step, exit 1, last good checkpoint intact;
- issue 13: one writer per folder (a second process exits 2 naming the holder's pid), data identity
  (resolved path, size and sha256) checked by resume and experiments, damaged log lines skipped,
  Ctrl-C while importing, SIGHUP, closed stdout under --json, outputs that imm did not write,
  control characters from files. (Bad config.json fields, paths and flags: tests/test_bad_inputs.py.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, clean_env, imm_command, run_imm, snapshot, tiny_configs
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
    assert f"resumed at step {k}; training to step {n}" in " ".join(r.stderr.split())
    assert "schedule" not in r.stderr  # the same --iters: no note about the learning rate

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
    assert "3-step schedule" in " ".join(r.stderr.split())  # a longer run re-draws the learning rate: said
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

    def poisoned(model, x, y, *rest):
        loss, parts = real(model, x, y, *rest)
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


def long_train(run: Path, cwd: Path) -> Proc:
    """A real `imm train` that goes on until stopped (no checkpoint but the first, no evaluation)."""
    return Proc(imm_command("train", *TINY, "--iters", "100000", "--save-every", "100000", "--eval-every", "100000",
                            "--out", str(run)), cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_saves_exits_130_and_resume_goes_on(sig, tmp_path, imm):
    """Ctrl-C, and SIGHUP (the terminal went away) like SIGTERM: stop after the step, save, exit 130."""
    run = tmp_path / "run"
    proc = long_train(run, tmp_path)
    proc.wait_for(lambda: len(train_steps(run)) >= 3)
    proc.p.send_signal(sig)
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


# --- issue 13: one writer per folder ---------------------------------------------------------------
@pytest.mark.slow
def test_a_second_process_on_a_training_run_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = long_train(run, tmp_path)
    first.wait_for(lambda: len(train_steps(run)) >= 1)
    for argv in (["train", *TINY, "--iters", "2", "--out", str(run)],  # the same --out
                 ["train", "--resume", str(run), "--iters", "200000"],  # a concurrent resume
                 ["usage", "--run", str(run), "--sequences", "2"]):  # an experiment writing into the run folder
        r = run_imm(argv, cwd=tmp_path)
        assert r.code == 2 and len(r.err_lines) == 1, r.stderr
        assert str(run) in r.stderr and f"pid {first.p.pid}" in r.stderr, r.stderr
    first.p.send_signal(signal.SIGINT)
    code, err = first.finish()
    assert code == 130, err
    k = runs.load_train_state(run)["step"]
    assert train_steps(run) == list(range(1, k + 1))  # one run's steps, each once
    assert not (run / runs.LOCK).exists() and not (run / "usage.json").exists()


@pytest.mark.slow
def test_two_trains_started_together_on_one_folder_leave_one_whole_run(tmp_path):
    run = tmp_path / "run"
    argv = imm_command("train", *TINY, "--iters", "3", "--out", str(run))
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    assert str(run) in refused and len([ln for ln in refused.splitlines() if ln.strip()]) == 1, refused
    assert train_steps(run) == [1, 2, 3]
    assert runs.load_train_state(run)["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sweep", "store", "train-resume"])
def test_a_folder_held_by_another_process_is_refused(command, run_copy, tmp_path):
    """The lock is held here (this process); a real `imm` on the same folder exits 2 naming this pid."""
    folder = tmp_path / "sw" if command == "sweep" else run_copy
    folder.mkdir(exist_ok=True)
    argv = {"sweep": ["sweep", "--slots", "4", "--iters", "2", "--layers", "1", "--heads", "2", "--embd", "32", "--batch-size", "8",
                      "--device", "cpu", "--facts", str(REPO / "examples" / "facts.txt"), "--out", str(folder)],
            "store": ["store", "--run", str(run_copy), "--sequences", "2"],
            "train-resume": ["train", "--resume", str(run_copy), "--iters", "3"]}[command]
    before = snapshot(folder)
    with runs.locked(folder):
        r = run_imm(argv, cwd=tmp_path)
    assert r.code == 2 and len(r.err_lines) == 1, r.stderr
    assert str(folder) in r.stderr and f"pid {os.getpid()}" in r.stderr, r.stderr
    assert snapshot(folder) == before


def test_a_stale_lock_file_of_a_killed_process_is_taken_over(run_copy, imm):
    (run_copy / runs.LOCK).write_text("999999\n")  # what kill -9 leaves: the file, no lock
    assert imm("train", "--resume", str(run_copy), "--iters", "3").code == 0
    assert not (run_copy / runs.LOCK).exists()


# --- issue 13: the data a run was trained on --------------------------------------------------------
def test_data_is_stored_resolved_with_its_fingerprint_and_checked(tmp_path, imm, monkeypatch):
    from imm_cli.data import load_default_corpus

    text = load_default_corpus()[:20_000]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "data.txt").write_text(text)
    (b / "data.txt").write_text(text[::-1])  # the same relative name, other content
    run = tmp_path / "run"
    monkeypatch.chdir(a)
    assert imm("train", *TINY, "--iters", "2", "--data", "data.txt", "--out", str(run)).code == 0
    cfg = json.loads((run / runs.CONFIG).read_text())
    assert cfg["train"]["data"] == str(a / "data.txt")
    assert cfg["data"] == {"path": str(a / "data.txt"), "bytes": len(text.encode()),
                           "sha256": hashlib.sha256(text.encode()).hexdigest()}

    monkeypatch.chdir(b)  # from another folder: the run's own file, found and checked
    assert imm("train", "--resume", str(run), "--iters", "3").code == 0
    assert imm("store", "--run", str(run), "--sequences", "2").code == 0

    (a / "data.txt").write_text(text.upper())  # changed in place
    for argv in (["train", "--resume", str(run), "--iters", "4"], ["store", "--run", str(run), "--sequences", "2"]):
        r = imm(*argv)
        assert r.code == 2 and len(r.err_lines) == 1 and "not the data" in r.stderr and "sha256" in r.stderr, r.stderr
    (a / "data.txt").unlink()  # moved away
    r = imm("train", "--resume", str(run), "--iters", "4")
    assert r.code == 2 and "does not exist" in r.stderr and "--data" in r.stderr
    r = imm("train", "--resume", str(run), "--iters", "4", "--data", "data.txt")  # b/data.txt: other content
    assert r.code == 2 and "not the data" in r.stderr
    (b / "copy.txt").write_text(text)
    assert imm("train", "--resume", str(run), "--iters", "4", "--data", "copy.txt").code == 0  # the same bytes: followed
    assert json.loads((run / runs.CONFIG).read_text())["train"]["data"] == str(b / "copy.txt")
    assert train_steps(run) == [1, 2, 3, 4]


# --- issue 13: damaged lines of the append-only logs --------------------------------------------------
DAMAGED_LINES = ['{"step": 1' + "0" * 5000 + ', "loss": 1.0}',  # an int of 5,001 digits: ValueError, not JSONDecodeError
                 "[" * 100_000,  # nesting too deep: RecursionError
                 "not json", "[1, 2]", '"a string"', "\udcff\ufffd garbage", "{}{}"]


def test_damaged_metrics_lines_are_skipped_on_resume(run_copy, imm):
    with open(run_copy / runs.METRICS, "a", encoding="utf-8", errors="surrogateescape") as f:
        for line in DAMAGED_LINES:
            f.write(line + "\n")
    r = imm("train", "--resume", str(run_copy), "--iters", "3")
    assert r.code == 0, r.stderr
    assert "damaged line(s) skipped" in r.stderr
    assert train_steps(run_copy) == [1, 2, 3]


def test_damaged_sweep_lines_are_skipped_and_counted(tmp_path):
    from imm_cli.experiments import sweep as S

    lines = ['{"name": "a", "figures": {}}', *DAMAGED_LINES, '{"name": 5, "figures": {}}', '{"name": "b", "figures": {}}']
    (tmp_path / S.JSONL).write_text("\n".join(lines) + "\n", errors="surrogateescape")
    done, skipped = S.read_records(tmp_path)
    assert sorted(done) == ["a", "b"] and skipped == len(DAMAGED_LINES) + 1  # and the record whose name is no string


def test_append_after_a_torn_line_keeps_every_whole_line(tmp_path):
    """What README promises for metrics.jsonl and sweep.jsonl: a line is whole or skipped, never merged."""
    runs.append_metrics(tmp_path, [{"step": 1, "loss": 2.0}])
    with open(tmp_path / runs.METRICS, "a") as f:
        f.write('{"step": 2, "lo')  # a crash in the middle of a line
    runs.append_metrics(tmp_path, [{"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}])
    rows, skipped = runs.read_jsonl(tmp_path / runs.METRICS)
    assert [r["step"] for r in rows] == [1, 2, 3] and skipped == 1
    runs.truncate_metrics(tmp_path, 2)  # a resume from step 2: rows up to it, no damaged line, atomically
    assert runs.read_jsonl(tmp_path / runs.METRICS) == ([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], 0)


def test_evaluation_stops_when_asked(run_copy):
    from imm_cli.data import load_corpus

    model, _ = runs.load_run(run_copy)
    calls = []
    out = train_mod.evaluate(model, load_corpus(None), 4, 1000, 8, torch.device("cpu"), stop=lambda: calls.append(1) or True)
    assert out == {} and len(calls) == 1 and model.training


def test_resume_of_a_read_only_run_folder_is_refused_before_any_work(run_copy, imm, monkeypatch):
    """(As root chmod does not stop writing, so the folder is made read-only for os.access.)"""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run_copy and mode & os.W_OK else real(p, mode, **kw))
    before = snapshot(run_copy)
    r = imm("train", "--resume", str(run_copy), "--iters", "4")
    assert r.code == 2 and len(r.err_lines) == 1 and "not writable" in r.stderr, r.stderr
    assert snapshot(run_copy) == before


# --- issue 13: the terminal, stdout, the first second ---------------------------------------------------
SIGINT_WHILE_IMPORTING = """
import os, signal, sys
# as at a terminal: a suite started in the background (nohup ... &) hands its children SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
class SigintOnTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, SigintOnTorchImport())
"""


def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C in the first second: a sitecustomize presses it when torch starts being imported."""
    (tmp_path / "sitecustomize.py").write_text(SIGINT_WHILE_IMPORTING)
    p = subprocess.run(imm_command("train", *TINY, "--iters", "2", "--out", str(tmp_path / "run")), cwd=tmp_path,
                       env=clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr.strip() == "interrupted", p.stderr
    assert not (tmp_path / "run").exists()


def test_json_with_stdout_closed_is_refused_before_any_work(run_copy, tmp_path):
    cmd = " ".join(shlex.quote(a) for a in imm_command("store", "--run", str(run_copy), "--sequences", "2", "--json"))
    p = subprocess.run(cmd + " >&-", shell=True, cwd=tmp_path, env=clean_env(), capture_output=False,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--json" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not (run_copy / "store.json").exists()


def test_outputs_are_marked_and_user_files_need_force(run_copy, tmp_path, imm):
    out = tmp_path / "o"
    args = ["--run", str(run_copy), "--sequences", "2", "--out", str(out)]
    assert imm("store", *args).code == 0
    assert imm("store", *args).code == 0  # an earlier output of the same command is replaced
    (out / "usage.json").write_text("the user's own\n")
    r = imm("usage", *args)
    assert r.code == 2 and "usage.json" in r.stderr and "--force" in r.stderr and len(r.err_lines) == 1
    assert (out / "usage.json").read_text() == "the user's own\n"
    assert imm("usage", *args, "--force").code == 0
    assert json.loads((out / "usage.json").read_text())["run"] == str(run_copy)
    assert imm("usage", *args).code == 0  # now it is imm's


def test_control_characters_from_files_never_reach_the_terminal(run_copy, tmp_path, imm, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    facts = tmp_path / "facts.txt"
    facts.write_bytes("\ufeffA\x1b]0;X\x07 b c.\nD\x1b[2J e f.\nG\u202eh i j.\n".encode())
    r = imm("recall", "--run", str(run_copy), "--facts", str(facts), "--context", "0", "--out", str(tmp_path / "o"), "--json")
    assert r.code == 0, r.stderr
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in r.stderr, repr(raw)
    assert "\\x1b]0;X\\x07" in r.stderr and "\\u202e" in r.stderr  # shown, escaped
    doc = json.loads(r.stdout)
    assert doc["facts"][0]["cue"] == "A\x1b]0;X\x07 b"  # the BOM is not part of the first cue


def test_the_console_escapes_what_it_did_not_style():
    from imm_cli.cli.common import SafeConsole

    buf = io.StringIO()
    con = SafeConsole(file=buf, force_terminal=True, color_system="standard", width=80)
    con.print("[bold]ok[/] \x1b]0;title\x07 \x9b31m", highlight=False)
    text = buf.getvalue()
    assert "\\x1b]0;title" in text and "\\x9b" in text and "\x07" not in text and "\x9b" not in text
    assert "\x1b[1m" in text  # rich's own style codes are kept
