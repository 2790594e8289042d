"""Speed and quality of imm side by side, measured in one process.

    python benchmarks/bench.py [--quick] [--json] [--run RUN] [--quality]

Training contenders (--slots 0, the default episodic memory, --memory linformer) run the real
training step of imm_cli.train (Batches, episode_loss, AdamW step, gradient clipping, one
host sync per step) on nanoGPT's CPU reference configuration (4 layers, 4 heads, 128 wide,
block 64, batch 12, lr 1e-3), interleaved round by round so machine noise hits all alike; figures
are medians over rounds of each round's mean step time (batches drawn several at a time count). nanoGPT's own step (benchmarks/nanogpt_baseline.py) runs in the same
rounds, so "--slots 0 vs nanoGPT" is measured side by side, not against a published figure.
The same pair (--slots 0, the default memory) is also timed at `imm train`'s own defaults
(block 128, batch 16, the embedded corpus), paired round by round: what a default training pays.
Also: greedy generation at batch 1 with and without the KV cache, the wall time of `imm recall`
and `imm needle` (defaults, examples/facts.txt), model FLOPs per token and utilisation against a
torch.matmul probe, and the peak RSS of a training process.
`--quality` adds the full 2,000-iteration reference training of --slots 0 and of the default
memory and their validation losses (minutes).

A rich table goes to stderr; `--json` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imm_cli.config import MemoryConfig, ModelConfig, TrainConfig  # noqa: E402
from imm_cli.data import load_corpus  # noqa: E402
from imm_cli.experiments.compare import paired_rounds, ratio_interval  # noqa: E402
from imm_cli.model import GPT  # noqa: E402
from imm_cli.train import BATCH_BUFFER, Batches, episode_loss, lr_at, make_optimizer  # noqa: E402
from nanogpt_baseline import NanoGPTTrainer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
FACTS = ROOT / "examples" / "facts.txt"
REFERENCE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)  # nanoGPT's CPU configuration
REFERENCE_TRAIN = dict(batch_size=12, iters=2000, lr=1e-3)
CONTENDERS = {
    "slots0": MemoryConfig(slots=0),
    "episodic": MemoryConfig(),  # the default memory
    "linformer": MemoryConfig(kind="linformer"),
}
NANOGPT_MS = 41.8  # nanoGPT on the reference configuration, 2-core CI machine (issue 6)
REFERENCE_NANOGPT = dict(block=64, batch=12, layers=4, heads=4, d=128, lr=1e-3, iters=2000)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- training speed


class Trainer:
    """One contender: model, optimizer and data stream, stepping exactly as imm_cli.train does."""

    def __init__(self, memory: MemoryConfig, corpus, seed: int = 1337, model: dict = REFERENCE,
                 train: dict = REFERENCE_TRAIN) -> None:
        self.mcfg = ModelConfig(**model, memory=memory)
        self.tcfg = TrainConfig(**train, seed=seed)
        torch.manual_seed(seed)
        self.model = GPT(self.mcfg).train()
        self.opt = make_optimizer(self.model, self.tcfg, torch.device("cpu"))
        self.segments = self.tcfg.effective_segments(memory)
        self.batches = Batches.for_model(corpus, self.model, self.tcfg, self.segments, seed)  # gap segments as imm train draws them
        self.step_no = 0

    def step(self) -> float:
        t0 = time.perf_counter()
        lr = lr_at(self.step_no, self.tcfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y, gap = self.batches.next()
        loss = episode_loss(self.model, x, y, gap)[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        torch.stack([loss.detach(), gnorm]).tolist()  # the NaN guard's one sync per step
        self.opt.step()
        self.step_no += 1
        return time.perf_counter() - t0

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.mcfg.block_size


def interleaved(trainers: dict, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Each contender's mean step time (s) per round, `rounds` rounds: `imm compare`'s paired rounds
    (every contender in turn, the order rotating, so machine noise hits them alike; a mean, not a
    median, so a round's time includes the steps that draw batches), counted in rounds, not seconds."""
    return paired_rounds({name: t.step for name, t in trainers.items()}, 0.0, steps=steps, min_rounds=rounds, warmup=warmup)


def bench_training(corpus, rounds: int, steps: int, warmup: int, text: str, tmp: Path) -> dict:
    trainers = {name: Trainer(mem, corpus) for name, mem in CONTENDERS.items()}
    trainers["nanogpt"] = NanoGPTTrainer(text, tmp, **REFERENCE_NANOGPT)
    per_round = interleaved(trainers, rounds, steps, warmup)
    ms = {name: 1000 * statistics.median(v) for name, v in per_round.items()}
    tps = {name: trainers[name].tokens_per_step / (ms[name] / 1000) for name in trainers}
    params = {name: sum(p.numel() for p in t.model.parameters()) for name, t in trainers.items()}
    ours = {n: t for n, t in trainers.items() if n in CONTENDERS}
    # each round's paired ratio (the same moment of the machine for both): the spread one run shows
    pair = {n: [s0 / t for s0, t in zip(per_round["slots0"], per_round[n])] for n in CONTENDERS if n != "slots0"}
    interval = {n: ratio_interval(per_round["slots0"], per_round[n]) for n in pair}
    return {"ms_per_iter": ms, "tokens_per_s": tps, "params": params, "ratio_per_round": pair, "ratio_interval": interval,
            "segments": {n: t.segments for n, t in ours.items()},
            "whole_episode_forward": {n: t.model.episode_path(t.segments, t.mcfg.block_size) for n, t in ours.items()}}


def bench_default_recipe(corpus, rounds: int, steps: int, warmup: int) -> dict:
    """The default memory against --slots 0 at `imm train`'s own defaults (block 128, batch 16,
    4-segment episodes with gap segments, the embedded corpus's mix), in paired rounds: what a user's
    default training pays for the memory, beside the reference configuration's figure."""
    trainers = {name: Trainer(CONTENDERS[name], corpus, model={}, train={}) for name in ("slots0", "episodic")}
    per_round = interleaved(trainers, rounds, steps, warmup)
    ms = {name: 1000 * statistics.median(v) for name, v in per_round.items()}
    pair = [s0 / t for s0, t in zip(per_round["slots0"], per_round["episodic"])]
    return {"ms_per_iter": ms, "train_ratio": ms["slots0"] / ms["episodic"], "ratio_per_round": pair,
            "train_ratio_interval": ratio_interval(per_round["slots0"], per_round["episodic"]),
            "config": {"block_size": ModelConfig().block_size, "batch_size": TrainConfig().batch_size}}


# ----------------------------------------------------------------------------- read cost vs memory size


@torch.no_grad()  # reads at inference (generation, experiments)
def bench_read_cost(sizes: tuple[int, ...], reps: int) -> dict:
    """Seconds per byte of the episodic memory's read as the memory grows (every entry filled with a
    random unit key): a segment of 128 bytes read at once, and one generated byte (decoding), with the
    default top-k read and with the dense read (topk 0), plus a segment's write (retention)."""
    from imm_cli.memory import Segment
    from imm_cli.memory.episodic import EpisodicMemory

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 129), generator=g)
    seg = Segment(ids=ids[:, :128], prev=ids[:, :0], targets=ids[:, 1:])
    one = Segment(ids=ids[:, 127:128], prev=ids[:, :127], targets=ids[:, 128:])
    h = torch.randn(1, 128, 128, generator=g)
    out = {"sizes": list(sizes), "segment_read_us_per_byte": {}, "decode_read_us_per_byte": {}, "write_us_per_byte": []}
    for topk in (MemoryConfig.topk, 0):  # the default top-k read, and the dense read
        seg_t, dec_t = [], []
        for M in sizes:
            mem = EpisodicMemory(MemoryConfig(size=M, topk=topk), 128).eval()
            state = mem.init_state(1)
            state["keys"] = torch.nn.functional.normalize(torch.randn(1, M, 64, generator=g), dim=-1)
            state["bytes"] = torch.randint(0, 256, (1, M), generator=g)
            state["score"] = torch.rand(1, M, generator=g)
            cache = mem.new_cache(1)
            mem.read_step(h[:, :127], Segment(ids=ids[:, :127], prev=ids[:, :0], targets=ids[:, 1:128]), state, cache)

            def timed(fn) -> float:
                fn()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                return (time.perf_counter() - t0) / reps

            seg_t.append(1e6 * timed(lambda: mem.read(h, seg, state)) / 128)

            def step():
                c = type(cache)(keys=cache.keys, bytes=cache.bytes)  # the same 127-byte window each time
                mem.read_step(h[:, :1], one, state, c)
            dec_t.append(1e6 * timed(step))
            if topk:
                out["write_us_per_byte"].append(1e6 * timed(lambda: mem.write(h, seg, state, torch.rand(1, 128))) / 128)
        out["segment_read_us_per_byte"]["topk" if topk else "dense"] = seg_t
        out["decode_read_us_per_byte"]["topk" if topk else "dense"] = dec_t
    out["topk"] = MemoryConfig.topk
    return out


def plot_read_cost(rc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, label) in enumerate((("segment_read_us_per_byte", "segment read (128 bytes at once)"),
                                       ("decode_read_us_per_byte", "decoding read (one byte)"))):
        for how, ls in (("topk", "-"), ("dense", "--")):
            ax.plot(rc["sizes"], rc[name][how], ls, marker="o", color=f"C{i}", label=f"{label}, {how}")
    ax.plot(rc["sizes"], rc["write_us_per_byte"], ":", marker="s", color="C2", label="write with retention (per byte)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(rc["sizes"], [f"{m:,}" for m in rc["sizes"]])
    ax.set_xlabel("memory size (entries stored)")
    ax.set_ylabel("microseconds per byte")
    ax.set_title(f"Episodic memory: read and write cost per byte as the memory grows\n(CPU, one sequence, top-{rc['topk']} vs dense read)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(mcfg: ModelConfig, segments: int) -> dict:
    """Training FLOPs per token (forward + backward = 3 x forward), counted per matmul.

    forward = 2*N_mm + 2*2*L*T*d (attention scores and values over the T-byte window, as in PaLM's
    6N + 12*L*T*d estimate) + memory read/write; N_mm = L*12*d^2 + d*V (blocks and the tied head).
    Episodic read (whole-episode path): each query scores the positions up to the end of its own
    segment, (segments+1)/2 * T on average (2*dk each), mixes their dv-wide values (2*dv each), then
    the output projection (2*dv*d) and the gate (2*d).
    Linformer: read q, out (2*2*d^2) and S-slot attention (2*2*S*d), write k, v (2*2*d^2) and
    S-slot pooling (2*2*S*d), the gate (2*d).
    """
    L, d, V, T = mcfg.n_layer, mcfg.n_embd, mcfg.vocab_size, mcfg.block_size
    n_mm = L * 12 * d * d + d * V
    fwd = 2 * n_mm + 4 * L * T * d
    mem = mcfg.memory
    mem_fwd = 0
    if mem.enabled and mem.kind == "episodic":
        dv = mem.value_dim or d
        seen = T * (segments + 1) / 2
        mem_fwd = 2 * mem.key_dim * seen + 2 * dv * seen + 2 * dv * d + 2 * d
    elif mem.enabled:
        mem_fwd = 4 * d * d + 4 * mem.slots * d + 4 * d * d + 4 * mem.slots * d + 2 * d
    return {"train": 3 * (fwd + mem_fwd), "forward": fwd + mem_fwd, "matmul_params": n_mm,
            "formula": "3 * (2*N_mm + 4*L*T*d + memory), N_mm = L*12*d^2 + d*V"}


def matmul_flops(seconds: float = 2.0) -> float:
    """The machine's fp32 matmul FLOP/s at the default thread count (best of square sizes)."""
    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.matmul(a, b)
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def bench_generation(corpus, new: int, reps: int) -> dict:
    """Greedy bytes at batch 1, the default model shape (block 128): cache on vs off, memory on vs off."""
    torch.manual_seed(0)
    text = torch.from_numpy(corpus.val[:4096].copy()).long()
    prompt = text[None, 200:216]
    models = {"memory": GPT(ModelConfig()).eval(), "slots0": GPT(ModelConfig(memory=MemoryConfig(slots=0))).eval()}
    states = {"memory": models["memory"](text[None, :128]).state, "slots0": None}  # one segment written
    times = {(m, c): [] for m in models for c in (True, False)}
    for m, model in models.items():  # warm up
        model.generate(prompt, 8, state=states[m], use_cache=True)
        model.generate(prompt, 8, state=states[m], use_cache=False)
    for _ in range(reps):
        for m, model in models.items():
            for cache in (True, False):
                t0 = time.perf_counter()
                model.generate(prompt, new, state=states[m], use_cache=cache)
                times[(m, cache)].append(time.perf_counter() - t0)
    tps = {f"{m}_{'cache' if c else 'nocache'}": new / statistics.median(v) for (m, c), v in times.items()}
    return {"tokens_per_s": tps, "new_bytes": new, "prompt_bytes": prompt.shape[1],
            "cache_speedup": {m: tps[f"{m}_cache"] / tps[f"{m}_nocache"] for m in models}}


# ----------------------------------------------------------------------------- commands


def imm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from imm_cli.cli.app import app; app()", *args]


def run_timed(args: list[str], env: dict | None = None) -> tuple[float, int, str, int]:
    """(wall seconds, exit code, stdout, peak RSS in MB) of one subprocess."""
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    try:
        rss = 0
        _, _, ru = os.wait4(p.pid, os.WNOHANG)  # already reaped by communicate on most systems
        rss = ru.ru_maxrss
    except ChildProcessError:
        rss = 0
    if p.returncode != 0:
        log(f"command failed ({p.returncode}): {' '.join(args[3:])}\n{err[-2000:]}")
    return wall, p.returncode, out, rss // 1024


def peak_rss_training(data: str | None, iters: int, tmp: Path) -> dict:
    """Peak resident memory of `imm train` (default memory, reference configuration) in its own process."""
    # VmHWM, this process's own peak: ru_maxrss would also count the benchmark's own peak, as Linux
    # carries it across the fork and exec that start the process (it read 4.6 GB so)
    code = (
        "import re, resource, sys; from imm_cli.cli.app import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "try:\n    kb = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "except (OSError, AttributeError):\n    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(kb, file=sys.stderr)\n"
    )
    args = ["train", "--layers", "4", "--heads", "4", "--embd", "128", "--block-size", "64", "--batch-size", "12",
            "--lr", "1e-3", "--iters", str(iters), "--eval-every", str(iters), "--out", str(tmp / "rss_run")]
    if data:
        args += ["--data", data]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    kb = int(p.stderr.strip().splitlines()[-1])
    return {"peak_rss_mb": kb / 1024, "iters": iters}


def trained_run(run: str | None, tmp: Path, data: str | None, iters: int) -> tuple[Path, str]:
    if run:
        return Path(run), f"--run {run}"
    out = tmp / "quick_run"
    args = ["train", "--iters", str(iters), "--eval-every", str(iters), "--out", str(out)]
    if data:
        args += ["--data", data]
    log(f"no --run given: training a quick default run ({iters} iterations) for recall and needle")
    wall, rc, _, _ = run_timed(imm_cmd(*args))
    if rc != 0:
        raise SystemExit("quick training run failed")
    return out, f"a quick default run trained here ({iters} iterations, {wall:.0f} s)"


def bench_experiments(run: Path, tmp: Path) -> dict:
    res = {}
    for name in ("recall", "needle"):
        out = tmp / f"{name}_out"
        wall, rc, stdout, _ = run_timed(imm_cmd(name, "--run", str(run), "--facts", str(FACTS), "--out", str(out), "--json"))
        doc = json.loads(stdout) if rc == 0 else {}
        res[name] = {"seconds": wall, "ok": rc == 0, "inner_seconds": doc.get("seconds")}
        if name == "needle" and rc == 0:
            res[name]["exact_match"] = doc["conditions"]["memory"]["exact_match"]
        if name == "recall" and rc == 0:
            res[name]["exact_match"] = doc["summary"]["memory"]["exact_match"]
    return res


# ----------------------------------------------------------------------------- quality


def bench_quality(corpus_path: str | None, tmp: Path) -> dict:
    """The full reference training for --slots 0 and the default memory; validation loss at 2,000."""
    from imm_cli.train import train

    res = {}
    for name in ("slots0", "episodic"):
        mcfg = ModelConfig(**REFERENCE, memory=CONTENDERS[name])
        tcfg = TrainConfig(**REFERENCE_TRAIN, data=corpus_path)
        log(f"quality: training {name} for {tcfg.iters} iterations")
        t0 = time.perf_counter()
        r = train(mcfg, tcfg, tmp / f"quality_{name}")
        res[name] = {"val_loss": r.val_loss, "val_loss_ablated": r.val_loss_ablated, "seconds": time.perf_counter() - t0,
                     "tokens_per_s": r.tokens_per_s}
    res["val_loss_gap"] = res["episodic"]["val_loss"] - res["slots0"]["val_loss"]
    return res


# ----------------------------------------------------------------------------- report


def render(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=True)
    t = Table(title=f"training, nanoGPT CPU reference config ({doc['data']}, {doc['threads']} threads, interleaved)")
    for col in ("contender", "ms/iter", "tokens/s", "vs --slots 0", "model FLOPs/token", "MFU"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    tr = doc["training"]
    for name in CONTENDERS:
        t.add_row(name + (" (default)" if name == "episodic" else ""), f"{tr['ms_per_iter'][name]:.1f}",
                  f"{tr['tokens_per_s'][name]:,.0f}", f"{tr['tokens_per_s'][name] / tr['tokens_per_s']['slots0']:.2f}",
                  f"{doc['flops_per_token'][name]['train'] / 1e6:.2f} M", f"{doc['mfu_by_contender'][name]:.2f}")
    t.add_row("nanoGPT's step (benchmarks/nanogpt_baseline.py)", f"{tr['ms_per_iter']['nanogpt']:.1f}",
              f"{tr['tokens_per_s']['nanogpt']:,.0f}", f"{tr['tokens_per_s']['nanogpt'] / tr['tokens_per_s']['slots0']:.2f}", "", "")
    con.print(t)
    lo, hi = doc["train_ratio_range"]
    ci = doc["train_ratio_interval"]
    con.print(f"episodic vs --slots 0, per interleaved round: {lo:.2f} to {hi:.2f} (median of rounds' times: {doc['train_ratio']:.3f}, "
              f"95% bootstrap interval over rounds {ci[0]:.3f} to {ci[1]:.3f})")
    d = doc["default_recipe"]
    con.print(f"the same pair at imm train's defaults (block {d['config']['block_size']}, batch {d['config']['batch_size']}): "
              f"{d['ms_per_iter']['slots0']:.1f} vs {d['ms_per_iter']['episodic']:.1f} ms/iter, episodic vs --slots 0 "
              f"{d['train_ratio']:.2f} (rounds {min(d['ratio_per_round']):.2f} to {max(d['ratio_per_round']):.2f}; "
              f"95% interval {d['train_ratio_interval'][0]:.2f} to {d['train_ratio_interval'][1]:.2f})")
    g = Table(title=f"greedy generation, batch 1, {doc['generation']['new_bytes']} bytes (default model shape)")
    for col in ("model", "with cache tok/s", "without cache tok/s", "speedup"):
        g.add_column(col, justify="left" if col == "model" else "right")
    gt = doc["generation"]["tokens_per_s"]
    for m in ("memory", "slots0"):
        g.add_row(m, f"{gt[m + '_cache']:,.0f}", f"{gt[m + '_nocache']:,.0f}", f"{doc['generation']['cache_speedup'][m]:.1f}x")
    con.print(g)
    o = Table(title="other figures")
    o.add_column("figure")
    o.add_column("value", justify="right")
    if doc.get("recall_seconds") is not None:
        o.add_row(f"imm recall, defaults, examples/facts.txt ({doc['experiments_run']})", f"{doc['recall_seconds']:.1f} s")
        o.add_row("imm needle, defaults, examples/facts.txt", f"{doc['needle_seconds']:.1f} s")
    o.add_row("machine matmul (torch.matmul probe)", f"{doc['matmul_flops'] / 1e9:.1f} GFLOP/s")
    o.add_row("peak RSS of a training process", f"{doc['peak_rss_mb']:.0f} MB")
    o.add_row("nanoGPT reference (issue 6, 2-core CI)", f"{NANOGPT_MS} ms/iter")
    if doc.get("quality"):
        q = doc["quality"]
        o.add_row("val loss at 2000, --slots 0", f"{q['slots0']['val_loss']:.3f}")
        o.add_row("val loss at 2000, default memory", f"{q['episodic']['val_loss']:.3f} ({q['val_loss_gap']:+.3f})")
    con.print(o)


def render_read_cost(rc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="episodic memory: microseconds per byte as the memory grows (one sequence)")
    k = rc["topk"]
    for col in ("entries", f"segment read top-{k}", "segment read dense", f"decode read top-{k}", "decode read dense", "write"):
        t.add_column(col, justify="right")
    for i, M in enumerate(rc["sizes"]):
        s, d = rc["segment_read_us_per_byte"], rc["decode_read_us_per_byte"]
        t.add_row(f"{M:,}", f"{s['topk'][i]:.1f}", f"{s['dense'][i]:.1f}", f"{d['topk'][i]:.1f}", f"{d['dense'][i]:.1f}",
                  f"{rc['write_us_per_byte'][i]:.1f}")
    Console(stderr=True).print(t)
    Console(stderr=True).print(f"plot: {rc['plot']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (noisier figures)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ap.add_argument("--run", help="trained run for imm recall / imm needle (default: train a quick one)")
    ap.add_argument("--quality", action="store_true", help="also the full 2,000-iteration reference trainings (minutes)")
    ap.add_argument("--no-experiments", action="store_true", help="skip timing imm recall and imm needle")
    ap.add_argument("--read-cost-only", action="store_true", help="only the read cost against memory size (seconds)")
    ap.add_argument("--out", default="runs/bench", help="folder for read_cost.png")
    a = ap.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log("read cost against memory size")
    rc = bench_read_cost((512, 2048, 8192, 32768, 65536), 3 if a.quick else 10)
    plot_read_cost(rc, out / "read_cost.png")
    rc["plot"] = str(out / "read_cost.png")
    if a.read_cost_only:
        render_read_cost(rc)
        if a.json:
            sys.stdout.write(json.dumps({"read_cost": rc}, indent=2) + "\n")
        return
    data = str(DATA) if DATA.exists() else None
    corpus = load_corpus(data)
    # steps per round a multiple of BATCH_BUFFER: every round then holds as many steps that draw batches
    rounds, steps, warmup = (5, BATCH_BUFFER, 5) if a.quick else (12, 2 * BATCH_BUFFER, 10)
    doc: dict = {"data": "tinyshakespeare.txt" if data else "embedded corpus (tinyshakespeare.txt not found)",
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": a.quick,
                 "reference": {**REFERENCE, **REFERENCE_TRAIN}}
    log(f"training: {rounds} interleaved rounds x {steps} steps per contender (nanoGPT's step included)")
    text = Path(data).read_text(encoding="utf-8") if data else bytes(corpus.train).decode("utf-8", errors="replace")
    with tempfile.TemporaryDirectory(prefix="imm_bench_nanogpt_") as tmpd:
        tr = bench_training(corpus, rounds, steps, warmup, text, Path(tmpd))
    doc["training"] = tr
    doc["ms_per_iter_nanogpt"] = tr["ms_per_iter"]["nanogpt"]
    doc["slots0_vs_nanogpt"] = tr["ms_per_iter"]["nanogpt"] / tr["ms_per_iter"]["slots0"]  # > 1: ours is faster
    doc["train_tokens_per_s"] = tr["tokens_per_s"]
    doc["ms_per_iter"] = tr["ms_per_iter"]
    doc["ms_per_iter_slots0"] = tr["ms_per_iter"]["slots0"]
    doc["train_ratio"] = tr["tokens_per_s"]["episodic"] / tr["tokens_per_s"]["slots0"]
    doc["train_ratio_linformer"] = tr["tokens_per_s"]["linformer"] / tr["tokens_per_s"]["slots0"]
    doc["train_ratio_range"] = [min(tr["ratio_per_round"]["episodic"]), max(tr["ratio_per_round"]["episodic"])]
    doc["train_ratio_interval"] = tr["ratio_interval"]["episodic"]  # where another run of this code may land (bootstrap, 95%)
    log(f"training at imm train's defaults: {rounds} paired rounds x {steps} steps, --slots 0 and episodic")
    doc["default_recipe"] = bench_default_recipe(load_corpus(None), rounds, steps, warmup)

    log("matmul probe")
    peak = matmul_flops(1.0 if a.quick else 3.0)
    doc["matmul_flops"] = peak
    doc["flops_per_token"] = {n: flops_per_token(replace(ModelConfig(**REFERENCE), memory=m), TrainConfig().effective_segments(m))
                              for n, m in CONTENDERS.items()}
    achieved = {n: doc["flops_per_token"][n]["train"] * tr["tokens_per_s"][n] for n in CONTENDERS}
    doc["achieved_flops"] = achieved
    doc["mfu_by_contender"] = {n: achieved[n] / peak for n in CONTENDERS}
    doc["mfu"] = doc["mfu_by_contender"]["episodic"]

    log("generation")
    gen = bench_generation(corpus, 200, 3 if a.quick else 5)
    doc["generation"] = gen
    doc["gen_tokens_per_s"] = gen["tokens_per_s"]
    doc["gen_cache_speedup"] = gen["cache_speedup"]["memory"]
    doc["gen_cache_speedup_slots0"] = gen["cache_speedup"]["slots0"]

    with tempfile.TemporaryDirectory(prefix="imm_bench_") as tmpd:
        tmp = Path(tmpd)
        log("peak RSS of a training process")
        doc.update(peak_rss_training(data, 20 if a.quick else 50, tmp))
        doc["recall_seconds"] = doc["needle_seconds"] = None
        if not a.no_experiments:
            run, how = trained_run(a.run, tmp, data, 300 if a.quick else 1000)
            doc["experiments_run"] = how
            log("imm recall and imm needle")
            ex = bench_experiments(run, tmp)
            doc["experiments"] = ex
            doc["recall_seconds"] = ex["recall"]["seconds"]
            doc["needle_seconds"] = ex["needle"]["seconds"]
        if a.quality:
            doc["quality"] = bench_quality(data, tmp)
    doc["read_cost"] = rc
    render(doc)
    render_read_cost(rc)
    if a.json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
