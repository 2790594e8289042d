"""Slot usage analysis: which slots does the model actually read from?

Same stream as the pattern storage test (consecutive validation text, batch 1, memory carried and
written). For sequence t and slot j: the read attention mass, summed over the sequence's tokens,
then normalised so the slots' mean is 1.0. That mean is 1.0 by construction, so it is not a finding; what can fail is reported instead:
normalised entropy (1.0 = perfectly even), min/max ratio, coefficient of variation, dead slots
(mean usage < 0.1) and dominant slots (mean usage > 3).

The evenness figures are given for the per-slot mean over sequences (the bar chart) and, averaged,
per sequence: memory that uses one slot per sequence but a different one each time looks even on
average and uneven per sequence.

A sequence whose read attention puts no mass on any slot (the episodic memory before its first
write: everything goes to its "nothing matches" option) has an undefined usage row (null), left
out of the figures and counted in `undefined_rows`. `read_mass` is the attention mass per token on
the slots before normalising (always 1.0 for the linformer memory; for the episodic memory the
share not given to "nothing matches").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from imm_cli.experiments import metrics as M
from imm_cli.experiments.store import SequenceRun, load_memory_run, make_stream, memory_summary, pick, state_nonfinite, walk


@dataclass
class UsageResult(SequenceRun):
    usage: list[list[float]]  # sequences x slots, each defined row averages 1.0; null rows undefined
    slot_mean: list[float]  # per-slot mean usage over defined rows (the bars)
    slot_min: list[float]
    slot_max: list[float]
    row_mean: list[float]  # the mean of each row: 1.0 by construction
    entropy: float
    min_max_ratio: float
    cv: float
    dead_slots: list[int]
    dominant_slots: list[int]
    per_sequence: dict  # entropy, min_max_ratio, cv per sequence and their means
    read_mass: list[float]  # attention mass on the slots per token, per sequence
    local_mass: list[float] | None  # episodic with `local`: attention mass on the segment's own earlier entries per token
    writes: list[float] | None  # episodic: share of the writes each slot received (sums to 1); linformer: None
    # (each linformer slot takes exactly one unit of write attention per segment by construction)
    gates: list[dict]  # per memory layer: layer, mean, std, min, max of the read gate
    retention: dict  # the memory's own account of its final state (episodic: entries kept, their surprise and age)
    undefined_rows: int
    nonfinite: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _l(x) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def slot_usage(run_dir: Path, sequences: int = 50, random_tokens: bool = False, seed: int = 0) -> UsageResult:
    model, cfg = load_memory_run(run_dir)
    torch.manual_seed(seed)
    block = model.cfg.block_size
    stream = make_stream(cfg, block, sequences, random_tokens, seed)
    T, S = sequences, model.cfg.memory.slots
    mass = np.zeros((T, S))
    read_mass = np.full(T, np.nan)
    local_mass = np.full(T, np.nan)
    writes = np.zeros(S)
    gates: list[np.ndarray] = []
    nonfinite = False
    state = None
    for t, records, logits, state in walk(model, stream):
        reads = pick(records, "read_attn")  # one per memory layer: (1 n s)
        for a in reads:
            a = a[0].double()
            if a.dim() == 3:  # (n h s) with heads
                a = a.sum(1)
            mass[t] += a.sum(0).numpy()
        n = stream.x.shape[1]
        read_mass[t] = mass[t].sum() / (n * max(1, len(reads)))
        local = pick(records, "local_attn")
        if local:
            local_mass[t] = float(sum(a.double().sum() for a in local)) / (n * len(local))
        gates += [g.reshape(-1).double().numpy() for g in pick(records, "gate")]
        for w in pick(records, "write_slot"):  # (1 s) one-hot: episodic, which slot was written
            writes += w[0].double().numpy()
        nonfinite |= (not torch.isfinite(logits).all()) or state_nonfinite(state) or not np.isfinite(mass[t]).all()

    u = M.normalise_usage(mass)
    defined = np.isfinite(u).all(axis=1)
    ud = u[defined]
    slot_mean = ud.mean(0) if len(ud) else np.full(S, np.nan)
    even = M.evenness(slot_mean)
    per = {k: [] for k in ("entropy", "min_max_ratio", "cv")}
    for row in u:
        per["entropy"].append(M.normalised_entropy(row))
        per["min_max_ratio"].append(M.min_max_ratio(row))
        per["cv"].append(M.cv(row))
    per_seq = {k: _l(v) for k, v in per.items()}
    per_seq.update({f"{k}_mean": M.nan_stats(v)["mean"] for k, v in per.items()})
    g = np.concatenate(gates) if gates else np.zeros(0)
    gs = M.nan_stats(g)
    layer = model.cfg.memory_layer
    notes = []
    if not defined.all():
        notes.append(f"{int((~defined).sum())} sequence(s) read nothing from the slots (empty memory): usage undefined there")
    if state is not None:
        empty = [j for j, f in enumerate(model.memory.slot_filled(state)[0].tolist()) if not f]
        if empty:  # dead by construction, not by disuse: nothing was ever stored there
            notes.append(f"slot(s) {', '.join(map(str, empty))} never held an entry after {T} segments "
                         "(the memory's budget is not full): they read nothing by construction")
    return UsageResult(
        run=str(run_dir), source=stream.source, sequences=T, block_size=block, seed=seed, random_tokens=random_tokens,
        memory=memory_summary(model, cfg),
        usage=[_l(r) for r in u], slot_mean=_l(slot_mean),
        slot_min=_l(ud.min(0) if len(ud) else np.full(S, np.nan)), slot_max=_l(ud.max(0) if len(ud) else np.full(S, np.nan)),
        row_mean=_l(u.mean(1)),
        entropy=even["entropy"], min_max_ratio=even["min_max_ratio"], cv=even["cv"],
        dead_slots=even["dead_slots"], dominant_slots=even["dominant_slots"],
        per_sequence=per_seq, read_mass=_l(read_mass),
        local_mass=_l(local_mass) if np.isfinite(local_mass).any() else None,
        writes=_l(writes / writes.sum()) if writes.sum() > 0 else None,
        gates=[{"layer": layer, "mean": gs["mean"], "std": gs["std"], "min": gs["min"], "max": gs["max"]}],
        retention=model.memory.describe(state) if state is not None else {},
        undefined_rows=int((~defined).sum()), nonfinite=bool(nonfinite), notes=notes,
    )
