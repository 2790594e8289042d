"""Recall of new facts at inference: facts shown once, then completed from their two-word cue.

Write: all facts are presented once as one text with memory updates on: one per line ("line"), or
       each inside a line of running held-out text ("prose").
Test:  memory frozen; for each fact a new context (other held-out text) ends with its cue (at a line
       start, or after other words on its line for "prose"), and the rest is generated greedily
       (exact match) and scored teacher-forced (character accuracy, loss per byte).
Controls, same prompts: a fresh memory, and a memory written the same way with the other half of the
facts only (fact i is never in it): both cannot recall fact i.
Context influence: KL(p_read_on || p_read_off) of the next-byte distributions, memory written,
read on vs ablated, at every position of prompt + true rest (how much the memory moves predictions).
Misses: each miss of the memory condition classified at its first wrong byte (experiments.misses).
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


SUFFIX = {"memory": "", "fresh": "_fresh", "other_facts": "_other"}  # per-fact field names of each condition


@dataclass
class RecallResult:
    settings: dict
    model: dict
    facts: list[dict]
    summary: dict[str, dict[str, float]]
    context_influence: dict
    seconds: float = 0.0
    verdict: str = ""
    extra: dict = field(default_factory=dict)
    misses: dict = field(default_factory=dict)  # why the memory condition missed (experiments.misses)
    notes: list[str] = field(default_factory=list)  # what to read the figures with (facts.cue_notes)

    def to_dict(self) -> dict:
        return asdict(self)


def shown_text(text: np.ndarray, facts: list[Fact], placement: str, rng: random.Random) -> bytes:
    """What the memory is shown: the facts one per line, or each inside a line of running text."""
    if placement == "line":
        return ("\n".join(f.text for f in facts) + "\n").encode()
    return b"".join(probe.haystack(text, f, len(f.text.encode()) + 96, 0.5, rng, "prose") for f in facts)


@torch.no_grad()
def run_recall(model: GPT, facts: list[Fact], text: np.ndarray, seed: int = 0, context: int = 32,
               placement: str = "line") -> RecallResult:
    if model.memory is None:
        raise InputError("this run has no memory (--slots 0): there is nothing to recall from; train with --slots 1 or more")
    if context < 0:
        raise InputError(f"--context must be >= 0 (got {context})")
    if placement not in PLACEMENTS:
        raise InputError(f"--placement must be line or prose (got {placement!r})")
    if len(facts) < 2:
        raise InputError("recall needs at least 2 facts (the other-facts control writes the other half)")
    B = model.cfg.block_size
    rests = probe.encode_rests(facts)
    P = context + 1 + max(len(f.cue.encode()) for f in facts)
    t0 = time.perf_counter()
    model.eval()
    device = model.wte.weight.device
    rng = random.Random(seed)
    N = len(facts)

    def write(fs: list[Fact]):
        shown = shown_text(text, fs, placement, rng)
        return probe.write_text(model, model.init_state(1, device), probe.as_ids([shown], device))[0], shown

    written, shown = write(facts)
    n_shown = len(shown)
    half = (N + 1) // 2  # the other-facts control: fact i's memory holds only the half without it
    halves = [write(facts[half:])[0], write(facts[:half])[0]]
    other = {k: torch.cat([halves[0][k].repeat_interleave(half, 0), halves[1][k].repeat_interleave(N - half, 0)])
             for k in written}
    prompts = probe.as_ids([probe.cue_prompt(text, f, P, rng, placement=placement) for f in facts], device)
    states = {"memory": probe.repeat_state(model, written, N), "fresh": model.init_state(N, device), "other_facts": other}

    per = {}
    for name, st in states.items():
        sc = probe.score_rests(model, st, prompts, rests)
        gen = probe.complete(model, st, prompts, max(len(r) for r in rests))
        per[name] = {"scores": sc, "generated": gen, "exact": probe.exact_matches(gen, rests)}
    why = misses.classify(model, states["memory"], prompts, rests, per["memory"]["generated"], [shown],
                          [f.cue for f in facts])

    with model.memory_mode(ablated=True):
        off = probe.score_rests(model, states["memory"], prompts, rests)
    on = per["memory"]["scores"]
    kl = (on["logp"].exp() * (on["logp"] - off["logp"])).sum(-1)  # (b R) over rest positions
    # the prompt positions too: the whole context, memory read on vs off
    x = prompts
    lp_on = torch.log_softmax(probe.window_logits(model, states["memory"], x).float(), -1)
    with model.memory_mode(ablated=True):
        lp_off = torch.log_softmax(probe.window_logits(model, states["memory"], x).float(), -1)
    kl_prompt = (lp_on.exp() * (lp_on - lp_off)).sum(-1)  # (b P)
    mask = on["mask"].float()
    rest_curve = ((kl * mask).sum(0) / mask.sum(0).clamp(min=1)).cpu().tolist()
    ctx = {
        "prompt_positions": kl_prompt.mean(0).cpu().tolist(),  # position p predicts byte p+1 of the prompt
        "rest_positions": rest_curve,  # position r predicts byte r of the rest (the last prompt byte predicts rest[0])
        "mean_kl_prompt": float(kl_prompt.mean()),
        "mean_kl_rest": float((kl * mask).sum() / mask.sum()),
        "cue_start": P - max(len(f.cue.encode()) for f in facts),  # first cue byte of the longest cue
    }

    rows = []
    for i, f in enumerate(facts):
        row = {"cue": f.cue, "expected": f.rest}
        for name in states:
            sfx = SUFFIX[name]
            row["generated" + sfx] = per[name]["generated"][i][: len(rests[i])].decode("utf-8", errors="replace")
            row["exact" + sfx] = bool(per[name]["exact"][i])
            row["char_accuracy" + sfx] = float(per[name]["scores"]["char_accuracy"][i])
            row["loss_per_byte" + sfx] = float(per[name]["scores"]["loss_per_byte"][i])
        rows.append(row)
    summary = {}
    for name in states:
        sfx = SUFFIX[name]
        summary[name] = {
            "exact_match": float(np.mean([r["exact" + sfx] for r in rows])),
            "char_accuracy": float(np.mean([r["char_accuracy" + sfx] for r in rows])),
            "loss_per_byte": float(np.mean([r["loss_per_byte" + sfx] for r in rows])),
        }
    m, fr, ot = summary["memory"], summary["fresh"], summary["other_facts"]
    if m["exact_match"] - max(fr["exact_match"], ot["exact_match"]) >= 0.3:
        verdict = (f"the memory recalls: exact match {m['exact_match']:.2f} vs {fr['exact_match']:.2f} with a fresh memory "
                   f"and {ot['exact_match']:.2f} with the other facts' memory")
    elif m["char_accuracy"] - fr["char_accuracy"] >= 0.1:
        verdict = (f"partial recall: character accuracy {m['char_accuracy']:.2f} vs {fr['char_accuracy']:.2f} fresh, "
                   f"exact match {m['exact_match']:.2f}")
    else:
        verdict = (f"no recall beyond a fresh memory: exact match {m['exact_match']:.2f} vs {fr['exact_match']:.2f}, "
                   f"character accuracy {m['char_accuracy']:.2f} vs {fr['char_accuracy']:.2f}")
    return RecallResult(
        settings={"seed": seed, "context": context, "facts": N, "bytes_shown": n_shown, "placement": placement},
        model={"memory": model.cfg.memory.kind, "slots": model.cfg.memory.slots, "block_size": B,
               "topk": model.cfg.memory.topk, **mix_of(model)},
        facts=rows, summary=summary, context_influence=ctx,
        seconds=time.perf_counter() - t0, verdict=verdict, misses=why, notes=cue_notes(facts),
    )
