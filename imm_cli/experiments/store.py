"""Pattern storage test: does the memory state resemble what it was shown?

Sequences are consecutive blocks of the validation split of the corpus the run was trained on
(or uniform random bytes with `random_tokens`, the notes' original setting), batch 1, memory
updates on and carried from one sequence to the next, each sequence given the previous one's bytes
as `prev` so the memory sees one continuous stream.

For sequence t, after the memory has written it:
  m_t   = mean over positions of the memory layer's (normalised) hidden states
  c_tj  = cos(slot_j, m_t) for every non-empty slot j (an empty slot is a zero vector: its cosine
          is undefined and left out, and the number of empty slots is reported)
  s_t   = mean_j c_tj, best_t = max_j c_tj
Controls, measured with the same m_t:
  initial         the memory in its initial (reset) state; for the episodic memory every slot is
                  empty there, so this control is undefined (reported as null, not 0)
  random          S random unit vectors of the same width, fresh for every t
  other_sequence  the memory after t compared with the mean hidden state of another sequence
                  (t + T/2 mod T), one it did not just store
Slot-to-slot cosine (mean over pairs of non-empty slots) tells collapse apart from storage: a
high s_t with slot-to-slot cosine near 1 means every slot holds the same average vector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from imm_cli import runs
from imm_cli.data import load_corpus
from imm_cli.errors import InputError
from imm_cli.experiments import metrics as M

MAX_SEQUENCES = 100_000


# --- shared with usage ----------------------------------------------------------------------------
@dataclass
class Stream:
    x: torch.Tensor  # (T n) the sequences, int64
    y: torch.Tensor  # (T n) the next byte of each position
    prev0: torch.Tensor  # (1 p) bytes just before the first sequence (p may be 0)
    source: str  # what the sequences are


def load_memory_run(run_dir: Path):
    """Load a run and refuse (InputError) one without memory. Returns (model, cfg dict)."""
    model, cfg = runs.load_run(run_dir)
    if model.memory is None:
        raise InputError(f"run {run_dir} has no memory (trained with --slots 0): nothing to measure; "
                         "train with --slots 1 or more")
    return model, cfg


def make_stream(cfg: dict, block: int, sequences: int, random_tokens: bool, seed: int) -> Stream:
    """`sequences` consecutive blocks of the validation split (start drawn with `seed`), or random bytes."""
    if not 1 <= sequences <= MAX_SEQUENCES:
        raise InputError(f"--sequences must be between 1 and {MAX_SEQUENCES} (got {sequences})")
    need = sequences * block + 1
    gen = torch.Generator().manual_seed(seed)
    if random_tokens:
        data = torch.randint(0, 256, (need,), generator=gen)
        return Stream(data[:-1].view(sequences, block), data[1:].view(sequences, block), data[:0].view(1, 0),
                      f"uniform random bytes (seed {seed})")
    path = (cfg.get("train") or {}).get("data")
    try:
        corpus = load_corpus(path)
    except InputError as e:
        raise InputError(f"cannot read the corpus this run was trained on: {e}") from None
    val = torch.from_numpy(corpus.val.astype(np.int64))
    if len(val) < need:
        fit = (len(val) - 1) // block
        raise InputError(f"the validation split of {corpus.source} holds {len(val):,} bytes: at most {fit} sequences "
                         f"of {block} bytes (asked for --sequences {sequences})")
    start = int(torch.randint(0, len(val) - need + 1, (1,), generator=gen))
    seq = val[start:start + need]
    prev0 = val[max(0, start - block):start].view(1, -1)
    return Stream(seq[:-1].view(sequences, block), seq[1:].view(sequences, block), prev0,
                  f"validation split of {corpus.source}, bytes {start:,}..{start + need - 1:,}")


def empty_slot_mask(mem, state: dict, vectors: torch.Tensor) -> torch.Tensor:
    """(b s) True where a slot holds nothing: the memory says so (`slot_filled`), or a ~zero vector."""
    return (vectors.norm(dim=-1) < M.EPS) | ~mem.slot_filled(state).to(vectors.device)


def state_nonfinite(state: dict) -> bool:
    """NaN or +inf anywhere in the memory state (-inf marks an empty episodic entry's score by design)."""
    for v in state.values():
        if not v.is_floating_point():
            continue
        bad = bool(torch.isnan(v).any() or torch.isposinf(v).any())
        if bad:
            return True
    return False


def walk(model, stream: Stream):
    """Run the sequences through the model one at a time, memory carried and written.

    Yields (t, records, logits, state_after) where records are the memory's observations of that call.
    """
    state = model.init_state(1)
    prev = stream.prev0
    with torch.no_grad(), model.memory_mode(frozen=False, ablated=False, observe=True) as mem:
        for t in range(stream.x.shape[0]):
            mem.observed.clear()
            idx = stream.x[t:t + 1]
            out = model(idx, targets=stream.y[t:t + 1], state=state, prev=prev)
            state = out.state
            records = list(mem.observed)
            mem.observed.clear()
            yield t, records, out.logits, state
            prev = idx


def pick(records: list[dict], key: str) -> list[torch.Tensor]:
    return [r[key] for r in records if key in r]


def memory_summary(model, cfg: dict) -> dict:
    total, mem = model.num_params()
    mc = model.cfg.memory
    return {"kind": mc.kind, "slots": mc.slots, "layer": model.cfg.memory_layer, "width": model.cfg.n_embd,
            "block_size": model.cfg.block_size, "params": total, "memory_params": mem,
            "memory_share": mem / total if total else math.nan}


# --- the experiment -------------------------------------------------------------------------------
@dataclass
class SequenceRun:
    """What store and usage share: where the sequences came from and which memory saw them."""

    run: str
    source: str
    sequences: int
    block_size: int
    seed: int
    random_tokens: bool
    memory: dict  # kind, slots, layer, width, params, memory_params, memory_share


@dataclass
class StoreResult(SequenceRun):
    per_sequence: list[float]  # s_t
    per_sequence_std: list[float]  # spread of c_tj over the non-empty slots at t
    best_slot: list[float]  # best_t
    empty_slots: list[int]  # empty slots after writing t
    mean: float
    std: float
    min: float
    max: float
    best_slot_mean: float
    trend: dict  # first / last tenth
    slot_cosine: float  # mean pairwise cosine between non-empty slots, final state
    slot_cosine_matrix: list[list[float]]  # final state, null for empty slots
    slot_cosine_per_sequence: list[float]
    controls: dict  # initial / random / other_sequence: per_sequence, mean, std
    nonfinite: bool
    nonfinite_where: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _nan_list(x) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def _control(series) -> dict:
    s = M.nan_stats(series)
    return {"per_sequence": _nan_list(series), "mean": s["mean"], "std": s["std"], "min": s["min"], "max": s["max"]}


def pattern_storage(run_dir: Path, sequences: int = 50, random_tokens: bool = False, seed: int = 0) -> StoreResult:
    model, cfg = load_memory_run(run_dir)
    torch.manual_seed(seed)
    block = model.cfg.block_size
    stream = make_stream(cfg, block, sequences, random_tokens, seed)
    mem = model.memory
    T, S, d = sequences, model.cfg.memory.slots, None
    rng = np.random.default_rng(seed)

    init_state = model.init_state(1)
    with torch.no_grad():
        init_vecs = mem.slot_vectors(init_state)[0]
        init_vecs = init_vecs.masked_fill(empty_slot_mask(mem, init_state, init_vecs[None])[0, :, None], 0.0).numpy()

    s, s_std, best, empty, offdiag = (np.full(T, np.nan) for _ in range(5))
    ctrl_init, ctrl_rand = np.full(T, np.nan), np.full(T, np.nan)
    means, slots_after = [], []
    where: list[str] = []
    final_matrix = np.full((S, S), np.nan)
    for t, records, logits, state in walk(model, stream):
        hidden = pick(records, "hidden")[-1][0]  # (n d)
        m_t = hidden.double().mean(0).numpy()
        with torch.no_grad():
            vecs = mem.slot_vectors(state)
            is_empty = empty_slot_mask(mem, state, vecs)[0]
            vecs = vecs[0].masked_fill(is_empty[:, None], 0.0).double().numpy()
        d = vecs.shape[-1]
        bad = [name for name, ok in (("logits", torch.isfinite(logits).all()), ("hidden states", torch.isfinite(hidden).all()),
                                     ("slot vectors", np.isfinite(vecs).all())) if not ok]
        if state_nonfinite(state):
            bad.append("memory state")
        where += [f"sequence {t}: {b}" for b in bad]
        cos = M.cosine_to_vector(vecs, m_t)
        st = M.nan_stats(cos)
        s[t], s_std[t], best[t] = st["mean"], st["std"], st["max"]
        empty[t] = int(is_empty.sum())
        mat = M.slot_cosine_matrix(vecs)
        offdiag[t] = M.mean_offdiag(mat)
        final_matrix = mat
        ctrl_init[t] = M.nan_stats(M.cosine_to_vector(init_vecs, m_t))["mean"]
        ctrl_rand[t] = M.nan_stats(M.cosine_to_vector(M.random_unit_vectors((S,), d, rng), m_t))["mean"]
        means.append(m_t)
        slots_after.append(vecs)
    ctrl_other = np.full(T, np.nan)
    if T > 1:
        for t in range(T):
            ctrl_other[t] = M.nan_stats(M.cosine_to_vector(slots_after[t], means[(t + T // 2) % T]))["mean"]

    stats = M.nan_stats(s)
    notes = []
    if np.all(np.isnan(ctrl_init)):
        notes.append("initial control undefined: every slot of the initial memory is empty (zero vectors)")
    if np.isfinite(offdiag[-1]) and offdiag[-1] > 0.95:
        notes.append("slots are nearly identical (slot-to-slot cosine > 0.95): similarity may be collapse, not storage")
    return StoreResult(
        run=str(run_dir), source=stream.source, sequences=T, block_size=block, seed=seed, random_tokens=random_tokens,
        memory=memory_summary(model, cfg),
        per_sequence=_nan_list(s), per_sequence_std=_nan_list(s_std), best_slot=_nan_list(best),
        empty_slots=[int(e) for e in empty],
        mean=stats["mean"], std=stats["std"], min=stats["min"], max=stats["max"],
        best_slot_mean=M.nan_stats(best)["mean"], trend=M.trend(s),
        slot_cosine=float(offdiag[-1]),
        slot_cosine_matrix=[_nan_list(row) for row in final_matrix],
        slot_cosine_per_sequence=_nan_list(offdiag),
        controls={"initial": _control(ctrl_init), "random": _control(ctrl_rand), "other_sequence": _control(ctrl_other)},
        nonfinite=bool(where), nonfinite_where=where[:20], notes=notes,
    )
