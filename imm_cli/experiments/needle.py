"""Needle in a haystack: is a fact seen once, inside other text, recalled later from its cue alone?

Protocol (per trial, batched over facts):
  write   each fact is put once, as a line, at `depth` of `length` bytes of held-out text, and the
          haystack is presented with memory updates on (a fresh memory per fact);
  test    memory frozen, a new context (other held-out text, no fact) ends with the two-word cue;
          the rest is generated greedily and scored teacher-forced.
Conditions side by side, same prompts:
  memory       the memory written with this fact's haystack;
  fresh        a fresh memory (nothing written): what the model guesses from the cue alone;
  other_facts  a memory written the same way with the haystacks of other facts (as many as its
               slots hold without evicting, at least one), never this one;
  in_context   a fresh memory, the fact inside the attention window before the cue (upper bound).
Figures per condition: exact match of the greedy rest, character accuracy (teacher-forced),
loss per byte of the true rest, recall@1 (the true rest has the lowest loss among all facts' rests).
Sweeps: haystack length x depth (memory condition) and number of facts stored (capacity).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from imm_cli.errors import InputError
from imm_cli.experiments import probe
from imm_cli.facts import Fact
from imm_cli.model import GPT

CONDITIONS = ("memory", "fresh", "other_facts", "in_context")
METRICS = ("exact_match", "char_accuracy", "loss_per_byte", "recall_at_1")


@dataclass
class NeedleSettings:
    length: int = 512  # haystack bytes around each fact
    depth: float = 0.5  # where the fact sits in its haystack (0 = start, 1 = end)
    trials: int = 3  # haystack draws; figures are mean and std over trials
    context: int = 32  # bytes of other text before the cue in the test context
    seed: int = 0
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)  # heatmap rows
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)  # heatmap columns
    capacity: tuple[int, ...] = (1, 2, 4, 8, 16)  # facts stored in one memory (capped at the facts given)
    sweeps: bool = True


@dataclass
class NeedleResult:
    settings: dict
    model: dict
    conditions: dict[str, dict[str, float]]
    facts: list[dict]
    heatmap: dict | None = None
    capacity: dict | None = None
    seconds: float = 0.0
    verdict: str = ""
    per_trial: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_facts(model: GPT, facts: list[Fact], context: int) -> None:
    """Every prompt + rest must fit one block, the fact-in-window control included."""
    if len(facts) < 2:
        raise InputError("needle needs at least 2 facts (recall@1 and the other-facts control compare facts)")
    B = model.cfg.block_size
    r_max = max(len(f.rest.encode()) for f in facts)
    for i, f in enumerate(facts):
        need_ic = len(f.text.encode()) + 2 + 1 + len(f.cue.encode()) + r_max - 1
        need = context + 1 + len(f.cue.encode()) + r_max - 1
        if max(need, need_ic) > B:
            raise InputError(
                f"fact {i + 1} ({f.text[:40]!r}) does not fit the model's {B}-byte window with its cue, "
                f"the longest rest and the fact-in-window control; use shorter facts or a model with a larger --block-size"
            )


def _prompt_len(facts: list[Fact], context: int) -> int:
    return context + 1 + max(len(f.cue.encode()) for f in facts)


@torch.no_grad()
def _evaluate(model: GPT, state, prompts: torch.Tensor, rests: list[bytes], with_rank: bool = True) -> dict:
    scores = probe.score_rests(model, state, prompts, rests)
    gen = probe.complete(model, state, prompts, max(len(r) for r in rests))
    exact = probe.exact_matches(gen, rests)
    out = {
        "exact": exact,
        "generated": gen,
        "char_accuracy": scores["char_accuracy"].cpu().tolist(),
        "loss_per_byte": scores["loss_per_byte"].cpu().tolist(),
    }
    if with_rank:
        out["recall_at_1"] = probe.recall_at_1(model, state, prompts, rests).cpu().tolist()
    return out


@torch.no_grad()
def _write_haystacks(model: GPT, rows: list[list[bytes]], device) -> object:
    """rows[i] = the haystacks memory i is shown, in order; returns the states (one per row)."""
    state = model.init_state(len(rows), device)
    for k in range(max(len(r) for r in rows)):
        ids = probe.as_ids([r[k] for r in rows], device)
        state, _ = probe.write_text(model, state, ids)
    return state


@torch.no_grad()
def run_trial(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings, rng: random.Random) -> dict:
    device = model.wte.weight.device
    N = len(facts)
    rests = probe.encode_rests(facts)
    P = _prompt_len(facts, s.context)
    hay = [probe.haystack(text, f, s.length, s.depth, rng) for f in facts]
    prompts = probe.as_ids([probe.cue_prompt(text, f, P, rng) for f in facts], device)
    B = model.cfg.block_size
    P_ic = B - max(len(r) for r in rests) + 1
    ic_prompts = probe.as_ids([probe.cue_prompt(text, f, P_ic, rng, before=b"\n" + f.text.encode() + b"\n") for f in facts], device)

    others = other_facts_count(model, N, s.length)
    states = {
        "memory": _write_haystacks(model, [[h] for h in hay], device),
        "fresh": model.init_state(N, device),
        "other_facts": _write_haystacks(model, [[hay[(i + k) % N] for k in range(1, others + 1)] for i in range(N)], device),
    }
    out = {name: _evaluate(model, st, prompts, rests) for name, st in states.items()}
    out["in_context"] = _evaluate(model, model.init_state(N, device), ic_prompts, rests)
    return out


def other_facts_count(model: GPT, n_facts: int, length: int) -> int:
    """How many other facts the control writes: as many haystacks as the slots hold (at least 1)."""
    segments = -(-length // model.cfg.block_size)
    return max(1, min(n_facts - 1, model.cfg.memory.slots // segments))


def _summarise(per_trial: list[dict]) -> dict[str, dict[str, float]]:
    res = {}
    for cond in CONDITIONS:
        row = {}
        for metric, key in (("exact_match", "exact"), ("char_accuracy", "char_accuracy"),
                            ("loss_per_byte", "loss_per_byte"), ("recall_at_1", "recall_at_1")):
            vals = [float(np.mean(t[cond][key])) for t in per_trial]
            row[metric] = float(np.mean(vals))
            row[metric + "_std"] = float(np.std(vals))
        res[cond] = row
    return res


@torch.no_grad()
def heatmap(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings) -> dict:
    """Memory condition for every (length, depth): exact match and character accuracy."""
    device = model.wte.weight.device
    rng = random.Random(s.seed + 10_000)
    rests = probe.encode_rests(facts)
    P = _prompt_len(facts, s.context)
    em = np.zeros((len(s.lengths), len(s.depths)))
    ca = np.zeros_like(em)
    for li, L in enumerate(s.lengths):
        hay, prompts, all_rests = [], [], []
        for d in s.depths:
            hay += [probe.haystack(text, f, L, d, rng) for f in facts]
            prompts += [probe.cue_prompt(text, f, P, rng) for f in facts]
            all_rests += rests
        state = _write_haystacks(model, [[h] for h in hay], device)
        r = _evaluate(model, state, probe.as_ids(prompts, device), all_rests, with_rank=False)
        N = len(facts)
        for di in range(len(s.depths)):
            em[li, di] = np.mean(r["exact"][di * N:(di + 1) * N])
            ca[li, di] = np.mean(r["char_accuracy"][di * N:(di + 1) * N])
    return {"lengths": list(s.lengths), "depths": list(s.depths), "exact_match": em.tolist(), "char_accuracy": ca.tolist()}


@torch.no_grad()
def capacity(model: GPT, facts: list[Fact], text: np.ndarray, s: NeedleSettings) -> dict:
    """n facts written into one memory (each in its own haystack, in order), then each recalled."""
    device = model.wte.weight.device
    rng = random.Random(s.seed + 20_000)
    P = _prompt_len(facts, s.context)
    ns = sorted({min(n, len(facts)) for n in s.capacity if n >= 1})
    res = {"n_facts": [], "exact_match": [], "char_accuracy": [], "memories": []}
    for n in ns:
        groups = len(facts) // n
        used = facts[: groups * n]
        hay = [probe.haystack(text, f, s.length, s.depth, rng) for f in used]
        state = _write_haystacks(model, [hay[g * n:(g + 1) * n] for g in range(groups)], device)
        prompts = probe.as_ids([probe.cue_prompt(text, f, P, rng) for f in used], device)
        r = _evaluate(model, probe.repeat_state(state, n), prompts, probe.encode_rests(used), with_rank=False)
        res["n_facts"].append(n)
        res["exact_match"].append(float(np.mean(r["exact"])))
        res["char_accuracy"].append(float(np.mean(r["char_accuracy"])))
        res["memories"].append(groups)
    return res


def verdict(conditions: dict[str, dict[str, float]]) -> str:
    m, f, o = conditions["memory"], conditions["fresh"], conditions["other_facts"]
    lift = m["exact_match"] - max(f["exact_match"], o["exact_match"])
    if m["exact_match"] >= 0.5 and lift >= 0.3:
        return (f"the memory recalls: exact match {m['exact_match']:.2f} vs {f['exact_match']:.2f} fresh and "
                f"{o['exact_match']:.2f} with other facts")
    if m["char_accuracy"] - f["char_accuracy"] >= 0.1:
        return (f"partial recall: character accuracy {m['char_accuracy']:.2f} vs {f['char_accuracy']:.2f} fresh, "
                f"but exact match only {m['exact_match']:.2f}")
    return (f"no recall beyond the controls: exact match {m['exact_match']:.2f} (fresh {f['exact_match']:.2f}), "
            f"character accuracy {m['char_accuracy']:.2f} (fresh {f['char_accuracy']:.2f})")


def run_needle(model: GPT, facts: list[Fact], text: np.ndarray, settings: NeedleSettings | None = None) -> NeedleResult:
    s = settings or NeedleSettings()
    if model.memory is None:
        raise InputError("this run has no memory (--slots 0): the needle test compares memory conditions; train with --slots 8")
    if s.trials < 1:
        raise InputError(f"--trials must be >= 1 (got {s.trials})")
    if not 0 <= s.depth <= 1 or not all(0 <= d <= 1 for d in s.depths):
        raise InputError("depths must be between 0 and 1")
    if s.length < 1 or any(L < 1 for L in s.lengths):
        raise InputError("haystack lengths must be positive")
    if s.context < 0:
        raise InputError(f"--context must be >= 0 (got {s.context})")
    check_facts(model, facts, s.context)
    if len(text) < max([s.length, *s.lengths]) + 1000:
        raise InputError("the validation text is too short for these haystack lengths")
    t0 = time.perf_counter()
    model.eval()
    per_trial = [run_trial(model, facts, text, s, random.Random(s.seed * 1000 + t)) for t in range(s.trials)]
    conditions = _summarise(per_trial)
    first = per_trial[0]
    fact_rows = []
    for i, f in enumerate(facts):
        row = {"cue": f.cue, "expected": f.rest, "conditions": {}}
        for cond in CONDITIONS:
            c = first[cond]
            row["conditions"][cond] = {
                "generated": c["generated"][i][: len(f.rest.encode())].decode("utf-8", errors="replace"),
                "exact": bool(c["exact"][i]),
                "char_accuracy": c["char_accuracy"][i],
                "loss_per_byte": c["loss_per_byte"][i],
                "recall_at_1": bool(c["recall_at_1"][i]),
            }
        fact_rows.append(row)
    result = NeedleResult(
        settings={**asdict(s), "facts": len(facts), "other_facts_written": other_facts_count(model, len(facts), s.length)},
        model={"memory": model.cfg.memory.kind if model.memory is not None else "none",
               "slots": model.cfg.memory.slots, "block_size": model.cfg.block_size},
        conditions=conditions,
        facts=fact_rows,
        per_trial=[{c: {"exact_match": float(np.mean(t[c]["exact"])), "char_accuracy": float(np.mean(t[c]["char_accuracy"]))}
                    for c in CONDITIONS} for t in per_trial],
    )
    if s.sweeps:
        result.heatmap = heatmap(model, facts, text, s)
        result.capacity = capacity(model, facts, text, s)
    result.verdict = verdict(conditions)
    result.seconds = time.perf_counter() - t0
    return result
