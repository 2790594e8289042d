"""The training loop: episodes of consecutive segments, memory carried (with gradients) through them.

One step takes `batch_size // segments` episodes. An episode is `segments` consecutive blocks of one
text; the memory starts fresh at the episode's start, is written after each segment and read by the
next, and the loss is backpropagated through every write of the episode. A share of the episodes
(`curriculum`) are synthetic-fact recall episodes: made-up facts written early, cued and answered
in the last segment, so the write and read paths learn to carry one-shot information.

The loop is plain functions over plain data (no typer, no rich): the CLI passes `on_event` to show
progress. Checkpoints are atomic (runs.py); Ctrl-C/SIGTERM stop after the current step and save.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from imm_cli import distributed, runs
from imm_cli.config import ModelConfig, TrainConfig, check_device
from imm_cli.curriculum import sample_curriculum
from imm_cli.data import Corpus, load_corpus, sample_episodes
from imm_cli.errors import InputError, RunError
from imm_cli.model import GPT

Event = dict
EVAL_SEED = 1234  # validation episodes are the same for every run and every evaluation
MAX_FACTS = 16  # synthetic facts per curriculum episode at most (as many as fit the write region)
BATCH_BUFFER = 8  # batches drawn at a time: drawing (mostly the curriculum's Python) costs about half as much per batch in a run as one at a time between steps, whose work leaves its caches cold (measured 0.72 -> 0.41 ms per batch at the bench's reference shape)


@dataclass
class TrainResult:
    run: str
    step: int
    params: int
    memory_params: int
    memory_share: float
    val_loss: float | None
    val_loss_ablated: float | None
    train_loss: float | None
    tokens_per_s: float
    nonfinite: bool
    interrupted: bool = False
    recall_acc: float | None = None
    recall_acc_ablated: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(name: str) -> torch.device:
    """The device `name` stands for, refused (InputError) when it is misspelt or not on this machine."""
    check_device(name)  # the one spelling rule (config.py), shared with TrainConfig.check
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: no MPS device is available on this machine")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr/10 at the last step (nanoGPT's schedule)."""
    warmup = min(cfg.warmup, max(cfg.iters // 10, 1))
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(cfg.iters - warmup, 1)
    return cfg.lr / 10 + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.lr / 10)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    keep = model.no_weight_decay()  # e.g. the episodic memory's n-gram table: what the memory declares
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in keep]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n in keep]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on CPU too: one kernel over all parameters, about 4x faster than foreach here (benchmarks/bench.py)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=fused, foreach=None if fused else True)


class Batches:
    """Episodes for training: corpus episodes plus a share of curriculum episodes, reproducibly."""

    def __init__(self, corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, segments: int, seed: int,
                 max_gap: int = 0) -> None:
        self.train = corpus.train
        self.block = model_cfg.block_size
        self.segments = segments
        self.episodes = cfg.batch_size // segments
        self.n_curriculum = int(round(cfg.curriculum * self.episodes)) if model_cfg.memory.enabled else 0
        self.max_gap = max_gap if segments >= 2 else 0
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self._ready: list = []  # batches drawn and not yet taken, the next one last
        self._mark = self._rng_states()  # the generators' states before those were drawn
        self._taken = 0  # batches taken since then

    def _rng_states(self) -> tuple:
        return self.gen.get_state(), self.rng.getstate()

    def _refill(self, n: int) -> None:
        self._mark, self._taken = self._rng_states(), 0
        self._ready = [self._draw() for _ in range(n)][::-1]

    @classmethod
    def for_model(cls, corpus: Corpus, model: GPT, cfg: TrainConfig, segments: int, seed: int) -> "Batches":
        """The batches `imm train` draws for this model: gap segments only where the memory reads them
        in the batched episode (the loop would run the transformer over every gap segment)."""
        batched = model.episode_path(segments + cfg.max_gap, model.cfg.block_size) == "batched"
        return cls(corpus, model.cfg, cfg, segments, seed, cfg.max_gap if batched else 0)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x, y (episodes, segments + gap, block) and the gap: half the steps none, else 1..max_gap
        segments of text between the episode's first segments (where curriculum facts are written)
        and its last (where they are cued). Drawn BATCH_BUFFER at a time, the same stream."""
        if not self._ready:
            self._refill(BATCH_BUFFER)
        self._taken += 1
        return self._ready.pop()

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        gap = self.rng.randint(1, self.max_gap) if self.max_gap and self.rng.random() < 0.5 else 0
        T = self.segments + gap
        x, y = sample_episodes(self.train, self.episodes - self.n_curriculum, T, self.block, self.gen)
        if self.n_curriculum:
            cx, cy, _ = sample_curriculum(self.train, self.n_curriculum, T, self.block, self.rng, max_facts=MAX_FACTS)
            x = torch.cat([x, cx.long()])
            y = torch.cat([y, cy.long()])
        return x, y, gap

    def state(self) -> dict:
        """Where the stream stands: the generators before the batches drawn last, and how many of
        those were taken (a resume draws them again and skips as many)."""
        gen, rng = self._mark
        return {"gen": gen, "rng": _py_rng_state(rng), "taken": self._taken}

    def load_state(self, st: dict) -> None:
        self.gen.set_state(st["gen"])
        self.rng.setstate(_py_rng_from_state(st["rng"]))
        taken = int(st.get("taken", 0))  # states saved before batches were drawn ahead: nothing taken
        self._ready, self._mark, self._taken = [], self._rng_states(), 0
        if taken:
            self._refill(max(BATCH_BUFFER, taken))
            del self._ready[len(self._ready) - taken:]
            self._taken = taken


def _py_rng_state(state: tuple) -> list:
    """random.Random.getstate() as JSON-able lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_state(st: list) -> tuple:
    return (st[0], tuple(st[1]), st[2])


def episode_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, gap: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean loss over an episode's scored segments, memory carried from each segment to the next
    (GPT.episode: one batched forward where the memory can read a whole episode exactly, else
    segment by segment); `gap` unscored segments before the last."""
    out = model.episode(x, y, gap=gap)
    loss = out.loss
    if out.aux_loss is not None:  # the memory's own loss enters the gradient, not the reported figure
        loss = loss + (out.aux_loss - out.aux_loss.detach())
    return loss, list(out.token_loss.unbind(1))


def segment_loop_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference path: segment by segment, the memory state carried (and written) between them."""
    out = model.episode(x, y, batched=False)
    return out.loss, list(out.token_loss.unbind(1))


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA devices that support it; full precision everywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def precision_of(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def compile_model(model: torch.nn.Module):
    """torch.compile'd `model` (the original module keeps the weights and is what is saved)."""
    if not hasattr(torch, "compile"):
        raise InputError("--compile needs torch.compile (torch 2.0 or later)")
    try:
        return torch.compile(model, backend=os.environ.get("IMM_COMPILE_BACKEND", "inductor"))
    except Exception as e:  # e.g. an unsupported Python version: refused at once
        raise InputError(f"--compile: torch.compile is not usable here ({(str(e).splitlines() or [type(e).__name__])[0][:160]}); run without --compile") from None


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, segments: int, batches: int, batch: int, device: torch.device,
             stop: Callable[[], bool] | None = None) -> dict:
    """Validation loss with the memory carried, and with its read ablated (same episodes).

    `stop()` is asked between batches: when it says so (Ctrl-C), the evaluation is dropped ({})."""
    model.eval()
    gen = torch.Generator().manual_seed(EVAL_SEED)
    block = model.cfg.block_size
    seg = max(segments, 2) if model.memory is not None else 1
    eps = max(batch // seg, 1)
    total = {"val_loss": 0.0, "val_loss_ablated": 0.0}
    try:
        with autocast_for(device):
            for _ in range(batches):
                if stop is not None and stop():
                    return {}
                x, y = sample_episodes(corpus.val, eps, seg, block, gen)
                x, y = x.to(device), y.to(device)
                total["val_loss"] += episode_loss(model, x, y)[0].item()
                if model.memory is not None:
                    with model.memory_mode(ablated=True):
                        total["val_loss_ablated"] += episode_loss(model, x, y)[0].item()
            out = {k: v / batches for k, v in total.items()}
            if model.memory is None:
                out["val_loss_ablated"] = out["val_loss"]
            else:
                out.update(_curriculum_recall(model, corpus, seg, block, device))
    finally:
        model.train()
    return out


@torch.no_grad()
def _curriculum_recall(model: GPT, corpus: Corpus, segments: int, block: int, device: torch.device, n: int = 16) -> dict:
    """Greedy next-byte accuracy on answer bytes of held-out synthetic facts (val text), memory on/off."""
    rng = random.Random(EVAL_SEED)
    x, y, mask = sample_curriculum(corpus.val, n, segments, block, rng)
    x, y, mask = x.long().to(device), y.long().to(device), mask.bool().to(device)[:, -1]
    res = {}
    for name, ablated in (("recall_acc", False), ("recall_acc_ablated", True)):
        with model.memory_mode(ablated=ablated):
            state = model.init_state(n, device)
            for s in range(segments):
                out = model(x[:, s], y[:, s], state=state, prev=x[:, s - 1] if s else None)
                state = out.state
            hit = (out.logits.argmax(-1) == y[:, -1]) & mask
            res[name] = hit.sum().item() / max(mask.sum().item(), 1)
    return res


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """A loaded optimizer state must fit the parameters (load_state_dict checks only their count)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"optimizer {name} has shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                    raise ValueError(f"optimizer {name} holds NaN or inf values")


class StopRequest:
    """Ctrl-C / SIGTERM / SIGHUP: the first asks to stop after this step; the second exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = 0

    def __call__(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: leave immediately, write nothing (the last checkpoint stays whole)
            try:
                os.write(2, b"\ninterrupted again: exiting at once without saving\n")
            finally:
                os._exit(130)
        self.requested = True
        self.signal = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _stop_on_signals(stop: StopRequest):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _dump_weights_for_tests(model: GPT, dist: distributed.Dist) -> None:
    """Tests only: IMM_TEST_DUMP_WEIGHTS=prefix makes every process write its final weights to prefix.rank<r>."""
    prefix = os.environ.get("IMM_TEST_DUMP_WEIGHTS")
    if prefix:
        from safetensors.torch import save_file

        save_file(runs._state_dict_for_save(model), f"{prefix}.rank{dist.rank}")


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> TrainResult:
    """Train (or resume) a model into the run folder `out`; returns the final figures.

    The folder is locked while this process writes it: a second process on it gets InputError."""
    emit = on_event or _quiet
    model_cfg.check()
    cfg.check(model_cfg.memory)
    if cfg.data is not None:  # the resolved path: a resume or an experiment from another folder finds the same file
        cfg = replace(cfg, data=str(Path(cfg.data).resolve()))
    out = Path(out)
    device = resolve_device(cfg.device)
    runs.check_fits(model_cfg, device, train_tokens=cfg.batch_size * model_cfg.block_size)
    dist = distributed.setup(device)  # under torchrun: join the process group (one device per process)
    try:
        with _folder_lock(out, resume, dist.main):
            return _train(model_cfg, cfg, out, resume, emit if dist.main else _quiet, dist)
    finally:
        dist.close()


def _quiet(event: Event) -> None:
    pass


@contextmanager
def _folder_lock(out: Path, resume: bool, main: bool):
    """Process 0 holds the run folder (created for a new run) while it trains; the others write nothing.
    A new run refused before its first checkpoint leaves no folder behind."""
    if not main:
        yield
        return
    made = [p for p in (out, *out.parents) if not p.exists()] if not resume else []
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
    try:
        with runs.locked(out):
            if not resume and (out / runs.CONFIG).exists():  # another process finished a run here meanwhile
                raise InputError(f"{out} already holds a run; continue it with --resume {out} or choose another folder")
            yield
    except InputError:
        for p in made:  # innermost first; only folders this call made, and only while empty
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _train(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, resume: bool, emit, dist: distributed.Dist) -> TrainResult:
    """The loop, top to bottom: data, model, optimizer, (resume), then steps with evaluation and checkpoints."""
    device = dist.device
    corpus, data_id = _load_data(model_cfg, cfg, out, resume)
    segments = cfg.effective_segments(model_cfg.memory)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    batches = Batches.for_model(corpus, model, cfg, segments, cfg.seed)  # the global batch: each process keeps its share
    if batches.episodes % dist.world:
        raise InputError(f"--batch-size {cfg.batch_size} holds {batches.episodes} episodes of {segments} segments, "
                         f"not divisible among {dist.world} processes")
    step = _load_checkpoint(out, model, optimizer, batches, cfg, device) if resume else 0
    _prepare_folder(out, step, resume, dist, emit)
    # (x, y, gap) -> loss: the episode loss as one module (torch.compile'd with --compile), DDP under
    # torchrun; `model` keeps the weights: saved, evaluated
    step_loss = distributed.wrap(model, episode_loss, dist, compile_model if cfg.compile else None)
    total, mem = model.num_params()
    emit({"type": "start", "params": total, "memory_params": mem, "step": step, "iters": cfg.iters, "device": str(device),
          "processes": dist.world, "precision": precision_of(device), "compile": cfg.compile,
          "segments": segments, "episodes": batches.episodes, "curriculum_episodes": batches.n_curriculum,
          "max_gap": batches.max_gap, "episode_path": model.episode_path(segments, model_cfg.block_size)})
    ckpt = Checkpoint(out, model, optimizer, batches, model_cfg, cfg, data_id, dist.main, step)
    stop = StopRequest()
    tokens_per_step = cfg.batch_size * model_cfg.block_size
    last: dict = {}
    t_start, first_step = time.perf_counter(), step
    model.train()
    with _stop_on_signals(stop):  # from the first checkpoint to the last: stop after the current step and save
        if not resume:
            ckpt.save(step, {"step": 0})
        while step < cfg.iters and not stop.requested:
            t0 = time.perf_counter()
            row = train_step(step, model, optimizer, batches, step_loss, cfg, dist, device, ckpt)
            step += 1
            row["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
            if step % cfg.eval_every == 0 or step == cfg.iters:
                row.update(evaluate(model, corpus, segments, cfg.eval_batches, cfg.batch_size, device,
                                    stop=lambda: stop.requested))
            last = {**last, **row}
            if dist.main:
                runs.append_metrics(out, [row])
            emit({"type": "step", **row, "iters": cfg.iters})
            stop.requested = dist.any(stop.requested)  # a signal seen by one process stops all at this step
            if not stop.requested and step % cfg.save_every == 0 and step < cfg.iters:
                ckpt.save(step, {"step": step})
        elapsed = time.perf_counter() - t_start
        total_tokens = (step - first_step) * tokens_per_step
        result = TrainResult(
            run=str(out), step=step, params=total, memory_params=mem, memory_share=mem / total,
            val_loss=last.get("val_loss"), val_loss_ablated=last.get("val_loss_ablated"),
            train_loss=last.get("loss"), tokens_per_s=total_tokens / elapsed if elapsed > 0 else 0.0, nonfinite=False,
            # a signal during the final save does not undo a finished run
            interrupted=stop.requested and step < cfg.iters,
            recall_acc=last.get("recall_acc"), recall_acc_ablated=last.get("recall_acc_ablated"),
        )
        ckpt.save(step, result.to_dict())
        _dump_weights_for_tests(model, dist)
        if dist.main:
            _plot_loss(out, emit)
    return result


def _load_data(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, resume: bool) -> tuple[Corpus, dict]:
    """The corpus and its identity (recorded in config.json); a resume checks it is the run's own data."""
    if resume:
        runs.check_data(out, cfg.data)  # missing or changed since the run was trained: refused
    corpus = load_corpus(cfg.data)
    data_id = runs.data_identity(cfg.data)
    segments = cfg.effective_segments(model_cfg.memory)
    if len(corpus.train) < segments * model_cfg.block_size + 2 or len(corpus.val) < max(segments, 2) * model_cfg.block_size + 2:
        raise InputError(f"data is too small for --block-size {model_cfg.block_size} x {segments} segments")
    return corpus, data_id


def _load_checkpoint(out: Path, model: GPT, optimizer, batches: Batches, cfg: TrainConfig, device) -> int:
    """Resume: weights, optimizer, data order and RNG from train_state.pt; returns its step."""
    st = runs.load_train_state(out)
    runs.load_weights_into(model, {k: v.to(device) for k, v in st["model"].items()}, out / runs.TRAIN_STATE)
    try:
        optimizer.load_state_dict(st["optimizer"])
        batches.load_state(st["batches"])
        torch.set_rng_state(st["torch_rng"])
        _check_optimizer_state(optimizer)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        first = (str(e).splitlines() or [e.__class__.__name__])[0][:160]
        raise InputError(f"{out / runs.TRAIN_STATE} is damaged: {first}") from None
    step = int(st["step"])
    if step >= cfg.iters:
        raise InputError(f"{out} already trained {step} steps; pass --iters above {step} to go on")
    return step


def _prepare_folder(out: Path, step: int, resume: bool, dist: distributed.Dist, emit) -> None:
    """Process 0 cleans the folder: a fresh log (new run) or the log cut back to the checkpoint (resume)."""
    if resume:
        dist.barrier()  # every process has read the training state before process 0 writes again
    if not dist.main:
        return
    if resume:
        skipped = runs.truncate_metrics(out, step)  # rows logged after the checkpoint are logged again
        if skipped:
            emit({"type": "warning", "message": f"{out / runs.METRICS}: {skipped} damaged line(s) skipped"})
    else:
        (out / runs.METRICS).unlink(missing_ok=True)
    runs.clean_temp_files(out)


class Checkpoint:
    """Atomic checkpoints by process 0: train_state.pt, then model.safetensors, then config.json (last:
    a folder with config.json is a whole run). `step` is the step of the last complete one."""

    def __init__(self, out: Path, model: GPT, optimizer, batches: Batches, model_cfg: ModelConfig, cfg: TrainConfig,
                 data_id: dict, main: bool, step: int) -> None:
        self.out, self.model, self.optimizer, self.batches = out, model, optimizer, batches
        self.model_cfg, self.cfg, self.data_id, self.main, self.step = model_cfg, cfg, data_id, main, step

    def save(self, step: int, summary: dict) -> None:
        if self.main:
            runs.save_train_state(self.out, {
                "step": step,
                "model": runs._state_dict_for_save(self.model),
                "optimizer": self.optimizer.state_dict(),
                "batches": self.batches.state(),
                "torch_rng": torch.get_rng_state(),
            })
            runs.save_weights(self.out, self.model, step)
            runs.save_config(self.out, self.model_cfg, self.cfg, summary, data=self.data_id)
        self.step = step


def train_step(step: int, model: GPT, optimizer, batches: Batches, step_loss, cfg: TrainConfig, dist: distributed.Dist,
               device: torch.device, ckpt: Checkpoint) -> dict:
    """One optimizer step on the next global batch; returns its metrics row. A non-finite loss or
    gradient norm stops before the update (RunError): the weights and the last checkpoint stay good."""
    lr = lr_at(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    x, y, gap = batches.next()
    x, y = dist.shard(x).to(device), dist.shard(y).to(device)
    try:
        with autocast_for(device):
            loss = step_loss(x, y, gap)
    except Exception as e:  # torch.compile fails lazily, at the first forward: one clear line
        if cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise RunError(f"--compile: torch.compile failed on this machine ({type(e).__name__}: {first}); run without --compile") from None
        raise
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: gradients averaged over the processes here
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    # the loss of the global batch and the gradient norm in one host sync (the NaN guard needs both)
    loss_v, gnorm_v = torch.stack([dist.mean(loss).detach().float(), gnorm.detach().float()]).tolist()
    _nan_guard(step + 1, loss_v, gnorm_v, ckpt)
    optimizer.step()
    return {"step": step + 1, "loss": loss_v, "lr": lr, "grad_norm": gnorm_v}


def _nan_guard(step: int, loss_v: float, gnorm_v: float, ckpt: Checkpoint) -> None:
    if math.isfinite(loss_v) and math.isfinite(gnorm_v):
        return
    if ckpt.main:
        runs.append_metrics(ckpt.out, [{"step": step, "event": "nonfinite", "loss": str(loss_v), "grad_norm": str(gnorm_v)}])
    what, value = ("loss", loss_v) if not math.isfinite(loss_v) else ("gradient norm", gnorm_v)
    raise RunError(f"non-finite {what} ({value}) at step {step}; stopped without saving it: the last good checkpoint "
                   f"(step {ckpt.step}) is in {ckpt.out}, resume with: imm train --resume {ckpt.out}")


def _plot_loss(out: Path, emit) -> None:
    try:
        from imm_cli.plots import plot_loss  # matplotlib is imported only when plotting

        plot_loss(runs.read_metrics(out), out / runs.LOSS_PLOT)
    except Exception as e:  # a plot must never lose a trained model
        emit({"type": "warning", "message": f"loss.png not written: {e}"})
