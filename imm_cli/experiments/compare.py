"""Several runs side by side: what each memory costs and what it stores and recalls.

`compare` reads, for every run folder, the training summary in config.json and the JSON results of
`imm store`, `imm usage`, `imm needle` and `imm recall` kept beside it. An experiment whose JSON is
missing (or older than the run's weights) is run with its defaults and its JSON written into the
run folder, as the command would; with `run_missing=False` it is reported as not run (None).
`imm recall` is only read (it is a different protocol from needle, shown where it exists).
A run without memory (--slots 0) has no memory experiments: they are None, with status "no memory".

Training throughput is measured here, not read: the run's configuration and the same configuration
with memory slots 0 take real training steps (imm_cli.train's batches, loss, AdamW, clipping, one
host sync) alternately in paired rounds, as benchmarks/bench.py does, so machine noise hits both
alike; the ratio is the median baseline step time over the median step time of the run (tokens per
second relative to --slots 0: 1.0 = as fast, 0.86 = 14% slower), with a 95% bootstrap interval over
the paired rounds (`ratio_interval`).

Needle results are read generically: conditions, and, where present, placements (placement ->
conditions), the capacity curve and any other curve (e.g. distance, document) with an x axis and a
memory condition and its controls. Nothing prints; progress goes to an optional callback.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from imm_cli import runs
from imm_cli.errors import InputError
from imm_cli.report import overrides_of

FILES = {"store": "store.json", "usage": "usage.json", "needle": "needle.json", "recall": "recall.json"}
RUNNABLE = ("store", "usage", "needle")  # run with defaults when missing; recall is only read
CONDITIONS = ("memory", "fresh", "other_facts", "in_context")  # needle conditions, in this order
CONDITION_METRICS = ("exact_match", "exact_match_std", "recall_at_1", "char_accuracy", "loss_per_byte")
STORE_CONTROLS = ("other_sequence", "initial", "random")
X_KEYS = ("n_facts", "distance", "distances", "bytes", "gap", "gaps", "lengths", "length", "x")
NOT_CURVES = {"settings", "model", "conditions", "facts", "heatmap", "per_trial", "files", "placements",
              "run", "facts_file", "seconds", "verdict", "notes"}
SLOTS0 = "the baseline itself (--slots 0)"


@dataclass
class CompareSettings:
    facts: Path = Path("examples/facts.txt")  # facts file for needle runs (relative to the CWD)
    run_missing: bool = True  # run store, usage and needle where their JSON is missing
    speed: bool = True  # measure training throughput against --slots 0
    speed_seconds: float = 15.0  # time budget of the paired speed rounds, per run
    device: str = "cpu"


@dataclass
class RunFigures:
    run: str
    name: str
    memory: dict  # kind, slots
    train: dict  # step, params, memory_params, memory_share, val_loss(_ablated), recall_acc(_ablated)
    store: dict | None = None
    usage: dict | None = None
    needle: dict | None = None
    recall: dict | None = None
    speed: dict | None = None
    status: dict = field(default_factory=dict)  # experiment -> read | ran | not run | no memory | failed: ...
    notes: list = field(default_factory=list)


@dataclass
class CompareResult:
    runs: list[RunFigures]
    settings: dict
    notes: list[str]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return runs.json_safe(asdict(self))


# --- input checks, before any work ----------------------------------------------------------------
def check_runs(paths: list[Path]) -> list[Path]:
    """At least one run; each an existing run folder; no run twice. One-line InputError otherwise."""
    if not paths:
        raise InputError("give at least one run folder (e.g. imm compare runs/s8 runs/lin)")
    seen: dict[Path, Path] = {}
    for p in paths:
        runs.read_config(p)  # missing folder, not a folder, not a run: one line each
        key = Path(p).resolve()
        if key in seen:
            raise InputError(f"run {p} is given twice (as {seen[key]} and {p})")
        seen[key] = Path(p)
    return [Path(p) for p in paths]


def has_memory(cfg: dict) -> bool:
    return int(((cfg.get("model") or {}).get("memory") or {}).get("slots", 0) or 0) > 0


def plan(paths: list[Path], settings: CompareSettings) -> dict[Path, list[str]]:
    """The experiments that will be run for each run folder (missing or stale JSON, memory present)."""
    todo: dict[Path, list[str]] = {}
    for p in paths:
        cfg = runs.read_config(p)
        todo[p] = [e for e in RUNNABLE if settings.run_missing and has_memory(cfg) and _read_json(p, e)[0] is None]
        if todo[p] and not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"run folder {p} is not writable, and {', '.join(FILES[e] for e in todo[p])} would be written "
                             "there; make it writable or pass --no-run")
        if todo[p]:
            runs.check_not_busy(p)  # another imm process writes it (training, an experiment)
    return todo


def check_facts_file(path: Path) -> None:
    """The facts file exists and parses (whether each fact fits a model is checked per run)."""
    from imm_cli.facts import load_facts

    if not Path(path).is_file():
        raise InputError(f"--facts {path} does not exist (needle runs on it where a run has no needle.json; or pass --no-run)")
    load_facts(path)


# --- reading what is there ------------------------------------------------------------------------
def _read_json(run: Path, experiment: str) -> tuple[dict | None, str]:
    """(document, why not) for one experiment's JSON in a run folder: None when missing, damaged or stale."""
    path = Path(run) / FILES[experiment]
    if not path.is_file():
        return None, "missing"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{path.name} is unreadable"
    if not isinstance(doc, dict):
        return None, f"{path.name} is not a JSON object"
    weights = Path(run) / runs.WEIGHTS
    if weights.is_file() and path.stat().st_mtime < weights.stat().st_mtime:
        return None, f"{path.name} is older than the run's weights"
    return doc, ""


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _numbers(v) -> list[float] | None:
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) or x is None for x in v):
        return [_num(x) for x in v]
    return None


def train_figures(cfg: dict, run: Path) -> dict:
    """Training figures from config.json's summary (parameters counted from the config if absent)."""
    s = cfg.get("summary") or {}
    keys = ("step", "params", "memory_params", "memory_share", "val_loss", "val_loss_ablated", "recall_acc",
            "recall_acc_ablated", "tokens_per_s")
    out = {k: _num(s.get(k)) for k in keys}
    out["nonfinite"] = s.get("nonfinite") if isinstance(s.get("nonfinite"), bool) else None
    if out["params"] is None:  # a run saved before its first summary (step 0): count from the config
        from imm_cli.model import GPT

        try:
            total, mem = GPT(runs.load_model_config(run)).num_params()
            out.update(params=total, memory_params=mem, memory_share=mem / total if total else None)
        except (InputError, AttributeError, TypeError, ValueError):
            pass  # shown as "-"
    for k in ("step", "params", "memory_params"):
        out[k] = int(out[k]) if out[k] is not None else None
    return out


def store_figures(doc: dict) -> dict:
    controls = doc.get("controls") or {}
    return {"mean": _num(doc.get("mean")), "std": _num(doc.get("std")), "best_slot_mean": _num(doc.get("best_slot_mean")),
            "slot_cosine": _num(doc.get("slot_cosine")), "sequences": doc.get("sequences"),
            "random_tokens": doc.get("random_tokens"),
            "controls": {c: {"mean": _num((controls.get(c) or {}).get("mean")), "std": _num((controls.get(c) or {}).get("std"))}
                         for c in STORE_CONTROLS},
            "nonfinite": doc.get("nonfinite")}


def usage_figures(doc: dict) -> dict:
    dead = doc.get("dead_slots")
    gates = [g for g in doc.get("gates") or [] if isinstance(g, dict)]
    return {"entropy": _num(doc.get("entropy")), "min_max_ratio": _num(doc.get("min_max_ratio")), "cv": _num(doc.get("cv")),
            "dead_slots": len(dead) if isinstance(dead, list) else None,
            "dominant_slots": len(doc["dominant_slots"]) if isinstance(doc.get("dominant_slots"), list) else None,
            "slots": len(doc["slot_mean"]) if isinstance(doc.get("slot_mean"), list) else None,
            "gate_mean": _num(gates[0].get("mean")) if gates else None}


def _conditions(d) -> dict:
    """condition -> the metrics shown, for every condition present (known ones first)."""
    if not isinstance(d, dict):
        return {}
    d = d.get("conditions", d) if isinstance(d.get("conditions"), dict) else d
    names = [c for c in CONDITIONS if c in d] + [c for c in d if c not in CONDITIONS]
    return {c: {m: _num(d[c].get(m)) for m in CONDITION_METRICS if m in d[c]} for c in names
            if isinstance(d.get(c), dict) and any(m in d[c] for m in CONDITION_METRICS)}


def as_curve(d) -> dict | None:
    """A curve from a needle entry: an x axis (a list of numbers) and exact match per condition, or None.

    Accepted shapes: {x: [...], "exact_match": [...]} (the memory condition, as capacity), or
    {x: [...], cond: [...] | {"exact_match": [...]}} for conditions, or the latter under "conditions",
    or a list of rows [{x: 512, cond: {"exact_match": y}}, ...].
    """
    if isinstance(d, list) and d and all(isinstance(row, dict) for row in d):  # rows: one dict per x
        d = {k: [row.get(k) for row in d] for k in d[0]}
    if not isinstance(d, dict):
        return None
    conds = d["conditions"] if isinstance(d.get("conditions"), dict) else d
    series = {}
    for c in [c for c in CONDITIONS if c in conds] + [c for c in conds if c not in CONDITIONS and isinstance(conds[c], dict)]:
        v = conds[c]
        if isinstance(v, list) and all(isinstance(x, dict) for x in v):  # per row: {"exact_match": y, ...}
            v = [x.get("exact_match") for x in v]
        ys = _numbers(v.get("exact_match")) if isinstance(v, dict) else _numbers(v)
        if ys:
            series[c] = ys
    if not series and _numbers(d.get("exact_match")):
        series["memory"] = _numbers(d["exact_match"])
    skip = set(CONDITIONS) | set(CONDITION_METRICS) | {"memories", "conditions"}
    x_key = next((k for k in X_KEYS if _numbers(d.get(k))), None) or next(
        (k for k, v in d.items() if k not in skip and k not in series and _numbers(v)), None)
    if not series or x_key is None:
        return None
    xs = _numbers(d[x_key])
    series = {c: ys for c, ys in series.items() if len(ys) == len(xs)}
    if not series:
        return None
    info = {k: v for k, v in d.items() if k != x_key and isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return {"x_name": x_key, "x": xs, "exact_match": series, "info": info}


def needle_figures(doc: dict) -> dict:
    """Conditions, placements and curves of a needle.json, whatever of them it holds."""
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    placements = doc.get("placements") if isinstance(doc.get("placements"), dict) else {}
    curves = {k: c for k, v in doc.items() if k not in NOT_CURVES for c in [as_curve(v)] if c is not None}
    headline = settings.get("placements") if isinstance(settings.get("placements"), list) else None
    return {"facts_file": doc.get("facts_file"), "facts": settings.get("facts"), "trials": settings.get("trials"),
            "length": settings.get("length"), "placement": headline[0] if headline else None,  # of the conditions
            "conditions": _conditions(doc.get("conditions")),
            "placements": {p: _conditions(v) for p, v in placements.items() if _conditions(v)},
            "curves": curves, "verdict": doc.get("verdict")}


def recall_figures(doc: dict) -> dict:
    s = doc.get("summary") if isinstance(doc.get("summary"), dict) else {}
    return {"facts_file": doc.get("facts_file"),
            "conditions": {c: {m: _num(v.get(m)) for m in ("exact_match", "char_accuracy", "loss_per_byte") if m in v}
                           for c, v in s.items() if isinstance(v, dict)}}


EXTRACT = {"store": store_figures, "usage": usage_figures, "needle": needle_figures, "recall": recall_figures}


# --- running what is missing ----------------------------------------------------------------------
def run_experiment(run: Path, experiment: str, settings: CompareSettings) -> dict:
    """Run one experiment with its defaults and write its JSON into the run folder, as its command does
    (holding the folder's lock throughout, on the data the run was trained on)."""
    with runs.locked(run):
        runs.check_data(run, resume=False)
        if experiment == "store":
            from imm_cli.experiments.store import pattern_storage

            doc = pattern_storage(run).to_dict()
        elif experiment == "usage":
            from imm_cli.experiments.usage import slot_usage

            doc = slot_usage(run).to_dict()
        elif experiment == "needle":
            from imm_cli.experiments.needle import run_needle
            from imm_cli.experiments.setup import open_facts, open_run

            model, _, text = open_run(run, settings.device)
            facts = open_facts(settings.facts, model)
            doc = {"run": str(run), "facts_file": str(settings.facts), **run_needle(model, facts, text).to_dict()}
        else:
            raise ValueError(f"compare does not run {experiment}")
        path = Path(run) / FILES[experiment]
        doc = runs.json_safe({**doc, "files": {"json": str(path)}})
        runs.atomic_write_json(path, doc)
    return doc


# --- training throughput ----------------------------------------------------------------------------
class StepTimer:
    """One contender of the speed rounds: imm_cli.train's own training step (learning-rate schedule,
    batches with gap segments as training draws them, loss, clipping, NaN guard, AdamW) on its own model."""

    def __init__(self, model_cfg, train_cfg, corpus, device) -> None:
        import torch

        from imm_cli import distributed
        from imm_cli.model import GPT
        from imm_cli.train import Batches, episode_loss, make_optimizer

        torch.manual_seed(train_cfg.seed)
        self.cfg, self.device = train_cfg, device
        self.model = GPT(model_cfg).to(device).train()
        self.opt = make_optimizer(self.model, train_cfg, device)
        segments = train_cfg.effective_segments(model_cfg.memory)
        self.batches = Batches.for_model(corpus, self.model, train_cfg, segments, train_cfg.seed)  # as imm train draws them
        self.dist = distributed.Dist(device=device)
        self.loss = distributed.wrap(self.model, episode_loss, self.dist)
        self.guard = SimpleNamespace(main=False, out=None, step=0)  # what the NaN guard reads of a checkpoint: writes nothing
        self.tokens = train_cfg.batch_size * model_cfg.block_size
        self.n = 0

    def step(self) -> float:
        from imm_cli.train import train_step

        t0 = time.perf_counter()
        train_step(self.n, self.model, self.opt, self.batches, self.loss, self.cfg, self.dist, self.device, self.guard)
        self.n += 1
        return time.perf_counter() - t0


def paired_rounds(contenders: dict[str, Callable[[], float]], seconds: float, steps: int = 8,
                  min_rounds: int = 3, warmup: int = 2) -> dict[str, list[float]]:
    """Time contenders in alternating rounds (order rotating) until `seconds` are spent, warm-up
    included (at least `min_rounds`); returns each contender's per-round mean step time in seconds.
    A mean over `steps` (imm train's BATCH_BUFFER): training draws that many batches at once, so
    every round holds one draw; a median, or fewer steps, would leave the draws out of most rounds."""
    t_end, r = time.perf_counter() + seconds, 0
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {n: [] for n in contenders}
    while r < min_rounds or time.perf_counter() < t_end:
        names = list(contenders)
        for n in names[r % len(names):] + names[: r % len(names)]:
            per_round[n].append(statistics.fmean(contenders[n]() for _ in range(steps)))
        r += 1
    return per_round


def ratio_interval(base: list[float], other: list[float], level: float = 0.95, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval (percentile, `level`) for median(base) / median(other) over paired
    rounds: rounds are resampled with replacement, a round's two times together, so the noise a
    round shares between contenders stays shared. One run's ratio says where it landed; the
    interval says how far another run of the same code could land from it."""
    import numpy as np

    b, o = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if b.shape != o.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("paired rounds: two equally long, non-empty lists of times")
    idx = np.random.default_rng(seed).integers(0, len(b), size=(draws, len(b)))
    ratios = np.median(b[idx], axis=1) / np.median(o[idx], axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def training_speed(run: Path, seconds: float, device_name: str = "cpu") -> dict:
    """Throughput of the run's training configuration relative to the same with memory slots 0."""
    from imm_cli.data import load_corpus
    from imm_cli.train import BATCH_BUFFER, resolve_device

    device = resolve_device(device_name)
    model_cfg, train_cfg = runs.load_model_config(run), runs.load_train_config(run)
    base_cfg = replace(model_cfg, memory=replace(model_cfg.memory, slots=0))
    try:
        corpus = load_corpus(train_cfg.data)
    except InputError:  # the run's data file is gone: the bytes do not change a step's time
        corpus = load_corpus(None)
    timers = {"run": StepTimer(model_cfg, train_cfg, corpus, device), "slots0": StepTimer(base_cfg, train_cfg, corpus, device)}
    per_round = paired_rounds({n: t.step for n, t in timers.items()}, seconds, steps=BATCH_BUFFER)
    ms = {n: 1000 * statistics.median(v) for n, v in per_round.items()}
    return {"ratio": ms["slots0"] / ms["run"], "ratio_interval": ratio_interval(per_round["slots0"], per_round["run"]),
            "ms_per_step": ms["run"], "ms_per_step_slots0": ms["slots0"],
            "tokens_per_s": timers["run"].tokens / ms["run"] * 1000,
            "tokens_per_s_slots0": timers["slots0"].tokens / ms["slots0"] * 1000,
            "rounds": len(per_round["run"]), "device": str(device), "measured": True}


# --- the comparison ---------------------------------------------------------------------------------
def _name(p: Path, paths: list[Path]) -> str:
    """The folder name, or the path as given where two runs share a folder name."""
    same = [q for q in paths if q.name == p.name]
    return p.name if len(same) == 1 and p.name else str(p)


def compare_run(run: Path, name: str, todo: list[str], settings: CompareSettings, progress: Callable[[str], None]) -> RunFigures:
    cfg = runs.read_config(run)
    mem = (cfg.get("model") or {}).get("memory") or {}
    fig = RunFigures(run=str(run), name=name, memory={"kind": mem.get("kind") if has_memory(cfg) else "none",
                                                       "slots": int(mem.get("slots", 0) or 0)},
                     train=train_figures(cfg, run))
    for exp in FILES:
        doc, why = _read_json(run, exp)
        if not has_memory(cfg):
            fig.status[exp] = "no memory"
            continue
        if exp in todo:
            progress(f"{name}: running {exp}" + (f" ({why})" if why != "missing" else ""))
            try:
                doc = run_experiment(run, exp, settings)
                fig.status[exp] = "ran"
            except InputError as e:
                fig.status[exp] = "failed"
                fig.notes.append(f"{exp} could not run: {e}")
                continue
        elif doc is None:
            fig.status[exp] = "not run"
            if why != "missing":
                fig.notes.append(why)
            continue
        else:
            fig.status[exp] = "read"
            found = overrides_of(doc.get("model"), mem)
            if found:
                fig.notes.append(f"{FILES[exp]} was measured with {', '.join(found)}: not the run's own settings "
                                 f"(run imm {exp} again without them for the run's figures)")
            if exp == "needle" and Path(str(doc.get("facts_file"))).name != Path(settings.facts).name:
                fig.notes.append(f"needle.json was measured on {doc.get('facts_file')}, not on --facts {settings.facts} "
                                 "(run imm needle again to measure that file)")
        setattr(fig, exp, EXTRACT[exp](doc))
    if not settings.speed:
        fig.status["speed"] = "not run"
    elif not has_memory(cfg):
        fig.speed = {"ratio": 1.0, "measured": False, "note": SLOTS0}
        fig.status["speed"] = "baseline"
    else:
        progress(f"{name}: timing training steps against --slots 0 (~{settings.speed_seconds:g} s)")
        try:
            fig.speed = training_speed(run, settings.speed_seconds, settings.device)
            fig.status["speed"] = "measured"
        except InputError as e:
            fig.status["speed"] = "failed"
            fig.notes.append(f"speed could not be measured: {e}")
    return fig


def _differs(values: list) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def compare(paths: list[Path], settings: CompareSettings | None = None,
            progress: Callable[[str], None] | None = None) -> CompareResult:
    """Check every input, then gather (and where asked, run) each run's figures."""
    s = settings or CompareSettings()
    from imm_cli.train import resolve_device

    if not s.speed_seconds >= 0:
        raise InputError(f"--speed-seconds must be >= 0 (got {s.speed_seconds})")
    resolve_device(s.device)  # a bad --device is refused before any work, not in the middle
    paths = check_runs(paths)
    todo = plan(paths, s)
    if any("needle" in t for t in todo.values()):
        check_facts_file(s.facts)
    t0 = time.perf_counter()
    figures = [compare_run(p, _name(p, paths), todo[p], s, progress or (lambda _m: None)) for p in paths]
    notes = []
    needles = [f.needle for f in figures if f.needle]
    if _differs([os.path.basename(str(n["facts_file"])) for n in needles]):
        notes.append("needle figures come from different facts files: " + ", ".join(
            sorted({str(n["facts_file"]) for n in needles})))
    if _differs([(n["facts"], n["trials"], n["length"]) for n in needles]):
        notes.append("needle figures come from different settings (facts, trials or haystack length differ)")
    if _differs([(f.store["sequences"], f.store["random_tokens"]) for f in figures if f.store]):
        notes.append("store figures come from different settings (sequences or random tokens differ)")
    return CompareResult(runs=figures, notes=notes, seconds=time.perf_counter() - t0,
                         settings={"facts": str(s.facts), "run_missing": s.run_missing, "speed": s.speed,
                                   "speed_seconds": s.speed_seconds, "device": s.device})
