"""A grid of memory configurations: each point a short training, then the store, usage and needle figures.

Layout of a sweep folder:
  sweep_settings.json  what every point shares (iters, model sizes, seed, data, facts): a folder
                       holds one sweep, a rerun with other shared settings is refused
  points/<name>/       the run folder of each point (what `imm train` makes, plus store/usage files)
  sweep.jsonl          one JSON line per finished point (appended whole in one write, fsynced): the
                       record of what is done; a damaged line is skipped with a note
  .imm.lock            while a sweep runs: a second sweep on the folder is refused
  optimal_config_results.png  the figures across the grid (drawn by the CLI, plots/sweep.py)

Resuming: a point already in sweep.jsonl is skipped; a point whose training was stopped resumes
from its last checkpoint; a point trained but not measured is measured without training again.
Facts that do not fit a point's block size make its needle figures null, with a note.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from imm_cli import runs
from imm_cli.config import ModelConfig, TrainConfig, configs_from_flags
from imm_cli.errors import InputError

JSONL = "sweep.jsonl"
SETTINGS = "sweep_settings.json"
PLOT = "optimal_config_results.png"

# figure -> (label, higher is better)
FIGURES = {
    "needle_recall_at_1": ("needle recall@1", True),
    "needle_exact_match": ("needle exact match", True),
    "needle_char_accuracy": ("needle char accuracy", True),
    "val_loss": ("validation loss", False),
    "recall_acc": ("curriculum recall", True),
    "store_similarity": ("pattern similarity", True),
    "usage_entropy": ("usage entropy", True),
}
TIEBREAK = "val_loss"


@dataclass
class SweepSettings:
    slots: tuple[int, ...] = (8,)
    block_size: tuple[int, ...] = (128,)
    memory_lr: tuple[float, ...] = (0.04,)
    memory_norm: tuple[str, ...] = ("layer",)
    memory_temp: tuple[float | None, ...] = (None,)
    memory: tuple[str, ...] = ("episodic",)  # as `imm train`; --memory-lr and --memory-norm act on linformer only
    iters: int = 100
    layers: int = 4
    heads: int = 4
    embd: int = 128
    batch_size: int = 16
    seed: int = 1337
    device: str = "auto"
    data: str | None = None
    sequences: int = 50  # store and usage: sequences walked
    needle_trials: int = 1  # needle: haystack draws (no length x depth or capacity sweeps in a sweep)

    def shared(self, facts: Path | None) -> dict:
        """What every point shares: a rerun on the same folder must agree on it."""
        d = asdict(self)
        for k in ("slots", "block_size", "memory_lr", "memory_norm", "memory_temp", "memory", "device"):
            d.pop(k)
        d["facts"] = str(facts) if facts is not None else None
        return d


@dataclass
class Point:
    memory: str
    slots: int
    block_size: int
    memory_lr: float
    memory_norm: str
    memory_temp: float | None

    @property
    def name(self) -> str:
        t = "auto" if self.memory_temp is None else f"{self.memory_temp:g}"
        return f"{self.memory}-s{self.slots}-b{self.block_size}-lr{self.memory_lr:g}-{self.memory_norm}-t{t}"


@dataclass
class SweepResult:
    out: str
    rank_by: str
    points: list[dict]  # records of this grid's points, best first
    trained: list[str]  # points trained (or resumed) by this call
    measured: list[str]  # points measured by this call
    skipped: list[str]  # points already in sweep.jsonl
    interrupted: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict | None:
        return self.points[0] if self.points else None

    def to_dict(self) -> dict:
        return {**asdict(self), "best": self.best["name"] if self.best else None}


def grid(s: SweepSettings) -> list[Point]:
    for name in ("slots", "block_size", "memory_lr", "memory_norm", "memory_temp", "memory"):
        if not getattr(s, name):
            raise InputError(f"--{name.replace('_', '-')} is empty")
    pts = [Point(memory=m, slots=sl, block_size=b, memory_lr=lr, memory_norm=n, memory_temp=t)
           for m in s.memory
           # the EMA rate and normalisation act on linformer only: other kinds take the first value, not
           # several identical trainings
           for sl, b, lr, n, t in itertools.product(s.slots, s.block_size, *_linformer_only(s, m), s.memory_temp)]
    seen, unique = set(), []
    for p in pts:
        if p.name not in seen:
            seen.add(p.name)
            unique.append(p)
    return unique


def _linformer_only(s: SweepSettings, memory: str) -> tuple[tuple, tuple]:
    return (s.memory_lr, s.memory_norm) if memory == "linformer" else (s.memory_lr[:1], s.memory_norm[:1])


def ignored_note(s: SweepSettings) -> str | None:
    """What the sweep says when --memory-lr or --memory-norm list several values that some kinds ignore."""
    others = [m for m in s.memory if m != "linformer"]
    if others and (len(set(s.memory_lr)) > 1 or len(set(s.memory_norm)) > 1):
        return (f"--memory-lr and --memory-norm act on the linformer memory only: the {', '.join(others)} points "
                f"take their first values ({s.memory_lr[0]:g}, {s.memory_norm[0]}), so none is trained twice")
    return None


def configs(p: Point, s: SweepSettings) -> tuple[ModelConfig, TrainConfig]:
    """A point's configs, through the flags table `imm train` uses (config.FLAGS)."""
    return configs_from_flags({
        "memory": p.memory, "slots": p.slots, "block_size": p.block_size, "memory_lr": p.memory_lr,
        "memory_norm": p.memory_norm, "memory_temp": p.memory_temp, "layers": s.layers, "heads": s.heads, "embd": s.embd,
        "iters": s.iters, "batch_size": s.batch_size, "seed": s.seed, "device": s.device, "data": s.data,
        "eval_every": s.iters, "save_every": max(s.iters // 4, 1),
    })


# --- sweep.jsonl: one whole line per finished point --------------------------------------------------
def read_records(out: Path) -> tuple[dict[str, dict], int]:
    """(finished points by name, damaged lines skipped); a torn or damaged line (a crash while appending,
    an edit) is skipped, and so is a line that is JSON but not a point record."""
    rows, skipped = runs.read_jsonl(Path(out) / JSONL)
    done: dict[str, dict] = {}
    for rec in rows:
        if isinstance(rec.get("name"), str) and isinstance(rec.get("figures"), dict):
            done[rec["name"]] = rec
        else:
            skipped += 1
    return done, skipped


def append_record(out: Path, rec: dict) -> None:
    """Append one line with a single write, then fsync: a line is either whole or skipped when read."""
    runs.append_jsonl(Path(out) / JSONL, [rec], fsync=True)


def check_settings(out: Path, shared: dict) -> None:
    """A folder holds one sweep: refuse a rerun whose shared settings differ (one line, naming the first)."""
    path = Path(out) / SETTINGS
    if not path.exists() and not path.is_symlink():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        saved = None
    if not isinstance(saved, dict) or not set(shared) <= set(saved):
        raise InputError(f"{path} is damaged (not the settings of a sweep); use another --out")
    for k, v in shared.items():
        if saved[k] != v:
            flag = "--" + k.replace("_", "-")
            raise InputError(f"--out {out} holds a sweep made with {flag} {saved[k]} (now {v}); "
                             f"run it with the same settings to go on, or choose another --out")


# --- one point ------------------------------------------------------------------------------------
def _train_point(p: Point, s: SweepSettings, run: Path, on_event) -> dict | None:
    """Train the point (resuming a stopped training); None when interrupted. Returns the training summary."""
    from imm_cli.train import train

    model_cfg, train_cfg = configs(p, s)
    summary = None
    if (run / runs.CONFIG).is_file():
        summary = runs.read_config(run).get("summary") or {}
        done_step = summary.get("step", 0)
        if isinstance(done_step, int) and done_step >= s.iters and "val_loss" in summary:
            return {**summary, "trained_now": False}
        resume = runs.load_train_state(run)["step"] < s.iters
    else:
        if run.exists():  # stopped before its first checkpoint was whole: start it again
            shutil.rmtree(run)
        resume = False
    t0 = time.perf_counter()
    result = train(model_cfg, train_cfg, run, resume=resume,
                   on_event=lambda e: on_event({**e, "point": p.name}))
    if result.interrupted:
        return None
    return {**result.to_dict(), "seconds": time.perf_counter() - t0, "trained_now": True}


def _measure(p: Point, s: SweepSettings, run: Path, facts: Path | None) -> tuple[dict, list[str]]:
    from imm_cli.experiments.needle import NeedleSettings, run_needle
    from imm_cli.experiments.setup import open_facts, open_run
    from imm_cli.experiments.store import pattern_storage
    from imm_cli.experiments.usage import slot_usage

    fig: dict = {}
    notes: list[str] = []
    try:
        st = pattern_storage(run, sequences=s.sequences)
        fig.update(store_similarity=st.mean, store_similarity_std=st.std, store_best_slot=st.best_slot_mean,
                   store_similarity_initial=st.controls.get("initial", {}).get("mean"),
                   store_similarity_random=st.controls.get("random", {}).get("mean"), store_nonfinite=st.nonfinite)
    except InputError as e:
        notes.append(f"store: {e}")
    try:
        us = slot_usage(run, sequences=s.sequences)
        fig.update(usage_entropy=us.entropy, usage_min_max=us.min_max_ratio, usage_cv=us.cv,
                   usage_dead_slots=len(us.dead_slots))
    except InputError as e:
        notes.append(f"usage: {e}")
    for k in ("needle_recall_at_1", "needle_exact_match", "needle_char_accuracy",
              "needle_recall_at_1_fresh", "needle_exact_match_fresh", "needle_char_accuracy_fresh"):
        fig[k] = None
    if facts is None:
        notes.append("needle: no --facts file")
    else:
        try:
            model, _, text = open_run(run, "cpu" if s.device == "auto" else s.device)
            fact_list = open_facts(facts, model)
            nr = run_needle(model, fact_list, text, NeedleSettings(trials=s.needle_trials, sweeps=False))
            for metric in ("recall_at_1", "exact_match", "char_accuracy"):
                fig[f"needle_{metric}"] = nr.conditions["memory"][metric]
                fig[f"needle_{metric}_fresh"] = nr.conditions["fresh"][metric]
        except InputError as e:  # e.g. facts longer than this point's block: figures stay null
            notes.append(f"needle: {e}")
    return fig, notes


def run_point(p: Point, s: SweepSettings, out: Path, facts: Path | None, on_event) -> dict | None:
    run = Path(out) / "points" / p.name
    t0 = time.perf_counter()
    summary = _train_point(p, s, run, on_event)
    if summary is None:
        return None
    on_event({"type": "measure", "point": p.name})
    t1 = time.perf_counter()
    fig, notes = _measure(p, s, run, facts)
    fig.update(val_loss=summary.get("val_loss"), val_loss_ablated=summary.get("val_loss_ablated"),
               train_loss=summary.get("train_loss"), recall_acc=summary.get("recall_acc"),
               recall_acc_ablated=summary.get("recall_acc_ablated"))
    return {
        "name": p.name, "point": asdict(p), "run": str(run), "figures": fig, "notes": notes,
        "train": {k: summary.get(k) for k in ("step", "params", "memory_params", "memory_share", "tokens_per_s")},
        "seconds": {"train": summary.get("seconds") if summary.get("trained_now") else 0.0,
                    "measure": time.perf_counter() - t1, "total": time.perf_counter() - t0},
    }


# --- ranking ----------------------------------------------------------------------------------------
def rank(records: list[dict], by: str) -> list[dict]:
    """Best first by `by` (points without the figure last), ties broken by validation loss."""
    if by not in FIGURES:
        raise InputError(f"--rank-by must be one of {', '.join(FIGURES)} (got {by!r})")
    higher = FIGURES[by][1]

    def key(r):
        v, tb = r["figures"].get(by), r["figures"].get(TIEBREAK)
        missing = v is None or (isinstance(v, float) and not math.isfinite(v))
        primary = 0.0 if missing else (-v if higher else v)
        return (missing, primary, math.inf if tb is None else tb)

    return sorted(records, key=key)


# --- the sweep --------------------------------------------------------------------------------------
def run_sweep(s: SweepSettings, out: Path, facts: Path | None, rank_by: str = "needle_recall_at_1",
              on_event: Callable[[dict], None] | None = None) -> SweepResult:
    emit = on_event or (lambda e: None)
    out = Path(out)
    if rank_by not in FIGURES:
        raise InputError(f"--rank-by must be one of {', '.join(FIGURES)} (got {rank_by!r})")
    if s.iters < 1:
        raise InputError(f"--iters must be >= 1 (got {s.iters})")
    points = grid(s)
    for p in points:  # every point's flags are checked before anything is trained, and that its model fits
        model_cfg, train_cfg = configs(p, s)
        runs.check_fits(model_cfg, "cpu", train_tokens=train_cfg.batch_size * model_cfg.block_size)
    shared = s.shared(facts)
    check_settings(out, shared)
    out.mkdir(parents=True, exist_ok=True)
    with runs.locked(out):  # one sweep at a time in a folder
        check_settings(out, shared)
        return _run_locked(s, points, shared, out, facts, rank_by, emit)


def _run_locked(s: SweepSettings, points: list[Point], shared: dict, out: Path, facts: Path | None, rank_by: str,
                emit) -> SweepResult:
    (out / "points").mkdir(exist_ok=True)
    if not (out / SETTINGS).is_file():
        runs.atomic_write_json(out / SETTINGS, shared)
    t0 = time.perf_counter()
    done, damaged = read_records(out)
    skipped = [p.name for p in points if p.name in done]
    todo = [p for p in points if p.name not in done]
    emit({"type": "sweep", "points": len(points), "done": len(skipped), "todo": [p.name for p in todo]})
    ignored = ignored_note(s)
    if ignored and todo:  # said before the training, not only after it
        emit({"type": "warning", "message": ignored})
    trained, measured, interrupted = [], [], False
    for i, p in enumerate(todo):
        emit({"type": "point", "point": p.name, "index": len(skipped) + i + 1, "points": len(points)})
        rec = run_point(p, s, out, facts, emit)
        if rec is None:
            interrupted = True
            break
        if rec["seconds"]["train"]:
            trained.append(p.name)
        measured.append(p.name)
        append_record(out, rec)
        done[p.name] = rec
        emit({"type": "point_done", "point": p.name, "record": rec})
    records = [done[p.name] for p in points if p.name in done]
    notes = [f"{out / JSONL}: {damaged} damaged line(s) skipped"] if damaged else []
    if ignored:
        notes.append(ignored)
    return SweepResult(out=str(out), rank_by=rank_by, points=rank(records, rank_by), trained=trained,
                       measured=measured, skipped=skipped, interrupted=interrupted,
                       seconds=time.perf_counter() - t0, notes=notes)


def varying(records: list[dict]) -> list[str]:
    """The grid dimensions that differ between points (what a label needs to show)."""
    keys = ["memory", "slots", "block_size", "memory_lr", "memory_norm", "memory_temp"]
    return [k for k in keys if len({json.dumps(r["point"][k]) for r in records}) > 1]


def label(rec: dict, dims: list[str]) -> str:
    short = {"memory": "", "slots": "s", "block_size": "b", "memory_lr": "lr", "memory_norm": "", "memory_temp": "t"}
    p = rec["point"]
    parts = []
    for k in dims or ["slots"]:
        v = p[k]
        parts.append(f"{short[k]}{'auto' if v is None else (f'{v:g}' if isinstance(v, float) else v)}")
    return " ".join(parts)
