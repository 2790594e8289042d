"""Needle in a haystack: is a fact seen once, inside other text, recalled later from its cue alone?

Protocol (per trial, batched over facts):
  write   each fact is put once at `depth` of `length` bytes of held-out text, on a line of its own
          ("line") or inside a line of running text ("prose"), and the haystack is presented with
          memory updates on (a fresh memory per fact);
  test    memory frozen, a new context (other held-out text, no fact) ends with the two-word cue (at
          a line start, or after other words on its line for "prose"); the rest is generated
          greedily and scored teacher-forced.
Conditions side by side, same prompts:
  memory       the memory written with this fact's haystack;
  fresh        a fresh memory (nothing written): what the model guesses from the cue alone;
  other_facts  the memory written with the next fact's haystack (same length, same placement),
               never this one: a memory as full as the first, holding the wrong fact;
  in_context   a fresh memory, the fact inside the attention window before the cue (upper bound);
               null, with a note, for facts too long to fit the window beside their cue.
Figures per condition: exact match of the greedy rest, character accuracy (teacher-forced),
loss per byte of the true rest, recall@1 (the true rest has the lowest loss among all facts' rests).

Sweeps, each beside its controls:
  heatmap   haystack length x depth (memory condition);
  distance  the fact at depth 0 of ever longer haystacks: bytes written after it (memory, fresh,
            other_facts);
  document  N facts spread through one text (`spacing` bytes each) written into one memory, each
            cued afterwards: the capacity curve in N, beside a fresh memory and the same text
            written without its facts ("text only").
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from imm_cli.errors import InputError
from imm_cli.experiments import misses, probe
from imm_cli.experiments.setup import mix_of
from imm_cli.facts import PLACEMENTS, Fact, cue_notes
from imm_cli.model import GPT

CONDITIONS = ("memory", "fresh", "other_facts", "in_context")
METRICS = ("exact_match", "char_accuracy", "loss_per_byte", "recall_at_1")
MAX_HAYSTACK = 65_536


@dataclass
class NeedleSettings:
    length: int = 512  # haystack bytes around each fact
    depth: float = 0.5  # where the fact sits in its haystack (0 = start, 1 = end)
    trials: int = 3  # haystack draws; figures are mean and std over trials
    context: int = 32  # bytes of other text before the cue in the test context
    seed: int = 0
    placements: tuple[str, ...] = ("line", "prose")  # how the fact and its cue sit in text; the first is the headline
    lengths: tuple[int, ...] = (1024, 4096)  # heatmap rows (up to 65,536); depth 0 of a distance length is reused
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)  # heatmap columns
    distance: tuple[int, ...] = (1024, 4096, 16384)  # haystacks with the fact at depth 0 (up to 65,536)
    document: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # facts in one document (capped at the facts given)
    spacing: int = 512  # bytes of text per fact in the document
    sweeps: bool = True


@dataclass
class NeedleResult:
    settings: dict
    model: dict
    conditions: dict[str, dict[str, float] | None]
    facts: list[dict]
    placements: dict[str, dict] = field(default_factory=dict)
    misses: dict[str, dict] = field(default_factory=dict)  # per placement: why the memory condition missed (experiments.misses)
    heatmap: dict | None = None
    distance: dict | None = None
    capacity: dict | None = None
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)  # where the time went: main conditions and each sweep
    verdict: str = ""
    notes: list[str] = field(default_factory=list)
    per_trial: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _prompt_len(facts: list[Fact], context: int) -> int:
    return context + 1 + max(len(f.cue.encode()) for f in facts)


def _fits_in_window(model: GPT, f: Fact, r_max: int) -> bool:
    """Whether the fact, a newline, its cue and the longest rest fit one window (the in-context control)."""
    return len(f.text.encode()) + 2 + 1 + len(f.cue.encode()) + r_max - 1 <= model.cfg.block_size


def _in_window_rows(model: GPT, facts: list[Fact], rests: list[bytes]) -> tuple[list[int], int]:
    """The facts the fact-in-window control tests, and the longest rest their batch generates: the
    largest set in which each fact, a newline, its cue and the set's longest rest fit one window
    (so one fact too long for the window leaves out itself, not the short ones beside it)."""
    best, best_r = [], 0
    for r in sorted({len(x) for x in rests}):
        rows = [i for i, f in enumerate(facts) if len(rests[i]) <= r and _fits_in_window(model, f, r)]
        if len(rows) > len(best):
            best, best_r = rows, r
    return best, best_r


def _in_window_groups(model: GPT, facts: list[Fact], rests: list[bytes]) -> list[tuple[list[int], int]]:
    """Batches of the fact-in-window control that together hold every fact fitting the window beside
    its cue on its own: the largest such batch first (`_in_window_rows`), then the largest among the
    facts left, and so on (a long rest in one batch would otherwise leave out facts that fit alone)."""
    groups, left = [], list(range(len(facts)))
    while left:
        rows, r_max = _in_window_rows(model, [facts[i] for i in left], [rests[i] for i in left])
        if not rows:
            break
        groups.append(([left[j] for j in rows], r_max))
        taken = set(rows)
        left = [i for j, i in enumerate(left) if j not in taken]
    return groups


@torch.no_grad()
def _evaluate(model: GPT, state, prompts: torch.Tensor, rests: list[bytes], with_rank: bool = True,
              written: list[bytes] | None = None, cues: list[str] | None = None) -> dict:
    """Scores of one condition; with `written` (the texts its memory was written with, or one for
    every row), also why each miss happened (experiments.misses)."""
    scores = probe.score_rests(model, state, prompts, rests)
    gen = probe.complete(model, state, prompts, max(len(r) for r in rests))
    out = {
        "exact": probe.exact_matches(gen, rests),
        "generated": gen,
        "char_accuracy": scores["char_accuracy"].cpu().tolist(),
        "loss_per_byte": scores["loss_per_byte"].cpu().tolist(),
    }
    if with_rank:
        out["recall_at_1"] = probe.recall_at_1(model, state, prompts, rests).cpu().tolist()
    if written is not None:
        out["misses"] = misses.classify(model, state, prompts, rests, gen, written, cues)
    return out


@torch.no_grad()
def _write_haystacks(model: GPT, rows: list[bytes], device) -> object:
    """One fresh memory per row, written with that row's text; returns the states (batched)."""
    state, _ = probe.write_text(model, model.init_state(len(rows), device), probe.as_ids(rows, device))
    return state


def _rotate(state, shift: int = 1):
    """Row i gets memory (i + shift) mod N: every fact tested against another fact's memory."""
    return None if state is None else {k: v.roll(-shift, dims=0) for k, v in state.items()}


def _prompts(text, facts, P, rng, placement, device):
    return probe.as_ids([probe.cue_prompt(text, f, P, rng, placement=placement) for f in facts], device)


@torch.no_grad()
def run_trial(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings, rng: random.Random,
              placement: str) -> dict:
    device = model.wte.weight.device
    N = len(facts)
    rests = probe.encode_rests(facts)
    P = _prompt_len(facts, s.context)
    hay = [probe.haystack(text, f, s.length, s.depth, rng, placement) for f in facts]
    prompts = _prompts(text, facts, P, rng, placement, device)
    written = _write_haystacks(model, hay, device)
    out = {"memory": _evaluate(model, written, prompts, rests, written=hay, cues=[f.cue for f in facts]),
           "fresh": _evaluate(model, model.init_state(N, device), prompts, rests),
           "other_facts": _evaluate(model, _rotate(written), prompts, rests)}
    out["in_context"] = _in_context(model, facts, rests, text, rng, placement)
    return out


def _in_context(model: GPT, facts: list[Fact], rests: list[bytes], text: np.ndarray, rng: random.Random,
                placement: str) -> dict | None:
    """The fact in the window, then the cue (the fact's own placement), for every fact that fits the
    window beside its cue (null if none does), in batches sharing a prompt length (`_in_window_groups`);
    recall@1 ranks each row's true rest among every fact's rest, as in the memory condition."""
    device, B = model.wte.weight.device, model.cfg.block_size
    merged: dict[str, list] = {}
    for rows, r_max in _in_window_groups(model, facts, rests):
        ic = probe.as_ids([probe.cue_prompt(text, facts[i], B - r_max + 1, rng, placement=placement,
                                            before=b"\n" + facts[i].text.encode() + b"\n") for i in rows], device)
        res = _evaluate(model, model.init_state(len(rows), device), ic, [rests[i] for i in rows], with_rank=False)
        res["recall_at_1"] = probe.recall_at_1(model, None, ic, rests, truth=rows).cpu().tolist()
        res["rows"] = rows
        for key, values in res.items():
            merged.setdefault(key, []).extend(values)
    if not merged:
        return None
    order = sorted(range(len(merged["rows"])), key=merged["rows"].__getitem__)  # fact order, as the other conditions
    return {key: [values[j] for j in order] for key, values in merged.items()}


def _summarise(per_trial: list[dict]) -> dict[str, dict[str, float] | None]:
    res: dict[str, dict[str, float] | None] = {}
    for cond in CONDITIONS:
        if any(t.get(cond) is None for t in per_trial):
            res[cond] = None
            continue
        row = {}
        for metric, key in (("exact_match", "exact"), ("char_accuracy", "char_accuracy"),
                            ("loss_per_byte", "loss_per_byte"), ("recall_at_1", "recall_at_1")):
            vals = [float(np.mean(t[cond][key])) for t in per_trial]
            row[metric] = float(np.mean(vals))
            row[metric + "_std"] = float(np.std(vals))
        row["facts"] = len(per_trial[0][cond]["exact"])  # facts scored (the in-window control: those that fit)
        res[cond] = row
    return res


@torch.no_grad()
def heatmap(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings, dist: dict | None = None) -> dict:
    """Memory condition for every (length, depth): exact match and character accuracy. A cell at
    depth 0 whose length the distance curve measured (`dist`) is taken from it, not measured twice."""
    device = model.wte.weight.device
    rng = random.Random(s.seed + 10_000)
    rests = probe.encode_rests(facts)
    P = _prompt_len(facts, s.context)
    place = s.placements[0]
    em = np.zeros((len(s.lengths), len(s.depths)))
    ca = np.zeros_like(em)
    N = len(facts)
    known = {} if dist is None else {L: i for i, L in enumerate(dist["lengths"])}
    for li, L in enumerate(s.lengths):
        todo = [di for di, d in enumerate(s.depths) if not (d == 0 and L in known)]
        for di, d in enumerate(s.depths):
            if di not in todo:
                em[li, di] = dist["memory"]["exact_match"][known[L]]
                ca[li, di] = dist["memory"]["char_accuracy"][known[L]]
        if not todo:
            continue
        hay, prompts = [], []
        for di in todo:
            hay += [probe.haystack(text, f, L, s.depths[di], rng, place) for f in facts]
            prompts += [probe.cue_prompt(text, f, P, rng, placement=place) for f in facts]
        r = _evaluate(model, _write_haystacks(model, hay, device), probe.as_ids(prompts, device), rests * len(todo),
                      with_rank=False)
        for j, di in enumerate(todo):
            em[li, di] = np.mean(r["exact"][j * N:(j + 1) * N])
            ca[li, di] = np.mean(r["char_accuracy"][j * N:(j + 1) * N])
    return {"lengths": list(s.lengths), "depths": list(s.depths), "placement": place,
            "exact_match": em.tolist(), "char_accuracy": ca.tolist()}


def _curve_point(r: dict) -> tuple[float, float]:
    return float(np.mean(r["exact"])), float(np.mean(r["char_accuracy"]))


@torch.no_grad()
def distance(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings) -> dict:
    """The fact at depth 0 of haystacks of each length (the bytes written after it), with controls."""
    device = model.wte.weight.device
    rng = random.Random(s.seed + 30_000)
    rests = probe.encode_rests(facts)
    P = _prompt_len(facts, s.context)
    place = s.placements[0]
    res = {"lengths": [], "placement": place, "misses": [], **{c: {"exact_match": [], "char_accuracy": []}
                                                               for c in ("memory", "fresh", "other_facts")}}
    fresh = None
    for L in s.distance:
        hay = [probe.haystack(text, f, L, 0.0, rng, place) for f in facts]
        written = _write_haystacks(model, hay, device)
        prompts = _prompts(text, facts, P, rng, place, device)
        if fresh is None:  # the fresh memory does not depend on the haystack: measured once
            fresh = _curve_point(_evaluate(model, model.init_state(len(facts), device), prompts, rests, with_rank=False))
        for cond, st in (("memory", written), ("other_facts", _rotate(written))):
            r = _evaluate(model, st, prompts, rests, with_rank=False, written=hay if cond == "memory" else None,
                          cues=[f.cue for f in facts])
            if "misses" in r:
                res["misses"].append(r["misses"])
            em, ca = _curve_point(r)
            res[cond]["exact_match"].append(em)
            res[cond]["char_accuracy"].append(ca)
        res["fresh"]["exact_match"].append(fresh[0])
        res["fresh"]["char_accuracy"].append(fresh[1])
        res["lengths"].append(L)
    return res


def document_text(text: np.ndarray, facts: list[Fact], spacing: int, rng: random.Random, placement: str,
                  with_facts: bool = True) -> bytes:
    """One text of len(facts) x spacing bytes, fact j inside its own `spacing`-byte stretch (at a random
    depth of it); without facts, the same stretches of text alone (the "text only" control)."""
    parts = []
    for f in facts:
        depth = rng.random()
        part = probe.haystack(text, f if with_facts else None, spacing, depth, rng, placement)
        parts.append(part)
    return b"".join(parts)


@torch.no_grad()
def document(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings) -> dict:
    """N facts spread through one text written into one memory, each cued afterwards, for each N."""
    device = model.wte.weight.device
    place = s.placements[0]
    P = _prompt_len(facts, s.context)
    ns = sorted({min(n, len(facts)) for n in s.document if n >= 1})
    res = {"n_facts": [], "bytes": [], "placement": place, "spacing": s.spacing, "misses": [],
           "memory_size": getattr(model.memory, "size", None),
           **{c: {"exact_match": [], "char_accuracy": []} for c in ("memory", "fresh", "text_only")}}
    for n in ns:
        rng = random.Random(s.seed + 20_000 + n)
        used = facts[:n]
        rests = probe.encode_rests(used)
        seed_text = rng.random()
        docs = {}
        for cond, with_facts in (("memory", True), ("text_only", False)):
            r2 = random.Random(seed_text)  # the same stretches of text, with and without the facts
            docs[cond] = document_text(text, used, s.spacing, r2, place, with_facts)
        prompts = _prompts(text, used, P, rng, place, device)
        states = {c: probe.repeat_state(model, _write_haystacks(model, [d], device), n) for c, d in docs.items()}
        states["fresh"] = model.init_state(n, device)
        for cond, st in states.items():
            r = _evaluate(model, st, prompts, rests, with_rank=False,
                          written=[docs[cond]] if cond == "memory" else None, cues=[f.cue for f in used])
            if "misses" in r:
                res["misses"].append(r["misses"])
            em, ca = _curve_point(r)
            res[cond]["exact_match"].append(em)
            res[cond]["char_accuracy"].append(ca)
        res["n_facts"].append(n)
        res["bytes"].append(len(docs["memory"]))
    return res


def verdict(conditions: dict[str, dict[str, float] | None]) -> str:
    m, f, o = conditions["memory"], conditions["fresh"], conditions["other_facts"]
    lift = m["exact_match"] - max(f["exact_match"], o["exact_match"])
    if m["exact_match"] >= 0.5 and lift >= 0.3:
        return (f"the memory recalls: exact match {m['exact_match']:.2f} vs {f['exact_match']:.2f} fresh and "
                f"{o['exact_match']:.2f} with another fact's memory")
    if m["char_accuracy"] - f["char_accuracy"] >= 0.1:
        return (f"partial recall: character accuracy {m['char_accuracy']:.2f} vs {f['char_accuracy']:.2f} fresh, "
                f"but exact match only {m['exact_match']:.2f}")
    return (f"no recall beyond the controls: exact match {m['exact_match']:.2f} (fresh {f['exact_match']:.2f}), "
            f"character accuracy {m['char_accuracy']:.2f} (fresh {f['char_accuracy']:.2f})")


def check_settings(s: NeedleSettings, facts: list[Fact]) -> None:
    if len(facts) < 2:
        raise InputError("needle needs at least 2 facts (recall@1 and the other-facts control compare facts)")
    if not 1 <= s.trials <= 100:
        raise InputError(f"--trials must be between 1 and 100 (got {s.trials})")
    if not 0 <= s.depth <= 1:
        raise InputError(f"--depth must be between 0 and 1 (got {s.depth:g})")
    if not all(0 <= d <= 1 for d in s.depths):
        raise InputError(f"--depths must be between 0 and 1 (got {','.join(f'{d:g}' for d in s.depths)})")
    if not s.placements or any(p not in PLACEMENTS for p in s.placements):
        raise InputError(f"--placement must be line, prose or line,prose (got {','.join(s.placements) or 'nothing'})")
    for name, values in (("--length", (s.length,)), ("--lengths", s.lengths), ("--distance", s.distance)):
        if any(not 1 <= L <= MAX_HAYSTACK for L in values):
            raise InputError(f"{name}: haystack lengths must be between 1 and {MAX_HAYSTACK:,} bytes")
    # a haystack (and a document's stretch per fact) holds its fact whole, with a line break on each
    # side ("line") or a space after it ("prose"): shorter ones would differ in length fact by fact
    longest = max(facts, key=lambda f: f.nbytes)
    need = longest.nbytes + 2
    for name, values in (("--length", (s.length,)), ("--lengths", s.lengths), ("--distance", s.distance), ("--spacing", (s.spacing,))):
        if values and min(values) < need:
            raise InputError(f"{name} {min(values)}: too short for the longest fact ({longest.nbytes} bytes, "
                             f"cue {longest.cue!r}) with its line breaks: at least {need} bytes")
    if any(not 1 <= n <= 1024 for n in s.document):
        raise InputError("--document: numbers of facts must be between 1 and 1024")
    if not 64 <= s.spacing <= 8192:
        raise InputError(f"--spacing must be between 64 and 8192 bytes (got {s.spacing})")
    if not 0 <= s.context <= 4096:
        raise InputError(f"--context must be between 0 and 4096 (got {s.context})")


def run_needle(model: GPT, facts: list[Fact], text: np.ndarray, settings: NeedleSettings | None = None) -> NeedleResult:
    s = settings or NeedleSettings()
    if model.memory is None:
        raise InputError("this run has no memory (--slots 0): the needle test compares memory conditions; train with --slots 1 or more")
    check_settings(s, facts)
    longest = max([s.length, *s.lengths, *s.distance, s.spacing])
    if len(text) < longest + 1000:
        raise InputError("the validation text is too short for these haystack lengths")
    t0 = time.perf_counter()
    model.eval()
    notes = cue_notes(facts)
    fit = {i for rows, _ in _in_window_groups(model, facts, probe.encode_rests(facts)) for i in rows}
    too_long = [i + 1 for i in range(len(facts)) if i not in fit]
    if too_long:
        notes.append(f"fact(s) {', '.join(map(str, too_long))} do not fit the {model.cfg.block_size}-byte window beside "
                     f"their cue: the fact-in-window control leaves them out" + (" (no fact fits: null)" if len(too_long) == len(facts) else ""))
    placements, miss = {}, {}
    trials_by_place = {}
    for place in s.placements:
        per_trial = [run_trial(model, facts, text, s, random.Random(s.seed * 1000 + t), place) for t in range(s.trials)]
        trials_by_place[place] = per_trial
        placements[place] = _summarise(per_trial)
        miss[place] = misses.merge([t["memory"]["misses"] for t in per_trial])
    first_place = s.placements[0]
    conditions = placements[first_place]
    first = trials_by_place[first_place][0]
    fact_rows = []
    for i, f in enumerate(facts):
        row = {"cue": f.cue, "expected": f.rest, "conditions": {}}
        for cond in CONDITIONS:
            c = first[cond]
            if c is None or ("rows" in c and i not in c["rows"]):
                row["conditions"][cond] = None
                continue
            j = c["rows"].index(i) if "rows" in c else i
            row["conditions"][cond] = {
                "generated": c["generated"][j][: len(f.rest.encode())].decode("utf-8", errors="replace"),
                "exact": bool(c["exact"][j]),
                "char_accuracy": c["char_accuracy"][j],
                "loss_per_byte": c["loss_per_byte"][j],
                "recall_at_1": bool(c["recall_at_1"][j]),
            }
        fact_rows.append(row)
    if any(n > len(facts) for n in s.document) and s.sweeps:
        notes.append(f"document: at most {len(facts)} facts (the facts given); larger N need a larger facts file")
    result = NeedleResult(
        settings={**asdict(s), "facts": len(facts)},
        model={"memory": model.cfg.memory.kind, "slots": model.cfg.memory.slots, "block_size": model.cfg.block_size,
               "topk": model.cfg.memory.topk,
               **mix_of(model)},
        conditions=conditions,
        placements=placements,
        misses=miss,
        facts=fact_rows,
        notes=notes,
        per_trial=[{c: (None if t[c] is None else {"exact_match": float(np.mean(t[c]["exact"])),
                                                   "char_accuracy": float(np.mean(t[c]["char_accuracy"]))})
                    for c in CONDITIONS} for t in trials_by_place[first_place]],
    )
    result.stage_seconds["conditions"] = time.perf_counter() - t0
    if s.sweeps:
        for name, fn in (("distance", distance), ("heatmap", heatmap), ("capacity", document)):
            t1 = time.perf_counter()
            setattr(result, name, fn(model, facts, text, s, result.distance) if name == "heatmap" else fn(model, facts, text, s))
            result.stage_seconds[name] = time.perf_counter() - t1
    result.verdict = verdict(conditions)
    result.seconds = time.perf_counter() - t0
    return result
