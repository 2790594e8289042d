"""Recall of new facts at inference: facts shown once, then completed from their two-word cue.

Write: all facts, one per line, are presented once as one text with memory updates on.
Test:  memory frozen; for each fact a new context (other held-out text) ends with its cue, and the
       rest is generated greedily (exact match) and scored teacher-forced (character accuracy,
       loss per byte). The same prompts with a fresh memory are the control that cannot recall.
Context influence: KL(p_read_on || p_read_off) of the next-byte distributions, memory written,
read on vs ablated, at every position of prompt + true rest (how much the memory moves predictions).
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

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def run_recall(model: GPT, facts: list[Fact], text: np.ndarray, seed: int = 0, context: int = 32) -> RecallResult:
    if model.memory is None:
        raise InputError("this run has no memory (--slots 0): there is nothing to recall from; train with --slots 8")
    if context < 0:
        raise InputError(f"--context must be >= 0 (got {context})")
    B = model.cfg.block_size
    rests = probe.encode_rests(facts)
    P = context + 1 + max(len(f.cue.encode()) for f in facts)
    if P + max(len(r) for r in rests) - 1 > B:
        raise InputError(f"the longest cue and rest with {context} bytes of context do not fit the model's {B}-byte window; "
                         "use shorter facts or --context smaller")
    t0 = time.perf_counter()
    model.eval()
    device = model.wte.weight.device
    rng = random.Random(seed)
    N = len(facts)

    shown = ("\n".join(f.text for f in facts) + "\n").encode()
    written, _ = probe.write_text(model, model.init_state(1, device), probe.as_ids([shown], device))
    prompts = probe.as_ids([probe.cue_prompt(text, f, P, rng) for f in facts], device)
    states = {"memory": probe.repeat_state(written, N), "fresh": model.init_state(N, device)}

    per = {}
    for name, st in states.items():
        sc = probe.score_rests(model, st, prompts, rests)
        gen = probe.complete(model, st, prompts, max(len(r) for r in rests))
        per[name] = {"scores": sc, "generated": gen, "exact": probe.exact_matches(gen, rests)}

    with model.memory_mode(ablated=True):
        off = probe.score_rests(model, states["memory"], prompts, rests)
    on = per["memory"]["scores"]
    kl = (on["logp"].exp() * (on["logp"] - off["logp"])).sum(-1)  # (b R) over rest positions
    # the prompt positions too: the whole context, memory read on vs off
    x = prompts
    lp_on = torch.log_softmax(model(x, state=states["memory"], write=False).logits.float(), -1)
    with model.memory_mode(ablated=True):
        lp_off = torch.log_softmax(model(x, state=states["memory"], write=False).logits.float(), -1)
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
            sfx = "" if name == "memory" else "_fresh"
            row["generated" + sfx] = per[name]["generated"][i][: len(rests[i])].decode("utf-8", errors="replace")
            row["exact" + sfx] = bool(per[name]["exact"][i])
            row["char_accuracy" + sfx] = float(per[name]["scores"]["char_accuracy"][i])
            row["loss_per_byte" + sfx] = float(per[name]["scores"]["loss_per_byte"][i])
        rows.append(row)
    summary = {}
    for name in states:
        sfx = "" if name == "memory" else "_fresh"
        summary[name] = {
            "exact_match": float(np.mean([r["exact" + sfx] for r in rows])),
            "char_accuracy": float(np.mean([r["char_accuracy" + sfx] for r in rows])),
            "loss_per_byte": float(np.mean([r["loss_per_byte" + sfx] for r in rows])),
        }
    m, fr = summary["memory"], summary["fresh"]
    if m["exact_match"] - fr["exact_match"] >= 0.3:
        verdict = f"the memory recalls: exact match {m['exact_match']:.2f} vs {fr['exact_match']:.2f} with a fresh memory"
    elif m["char_accuracy"] - fr["char_accuracy"] >= 0.1:
        verdict = (f"partial recall: character accuracy {m['char_accuracy']:.2f} vs {fr['char_accuracy']:.2f} fresh, "
                   f"exact match {m['exact_match']:.2f}")
    else:
        verdict = (f"no recall beyond a fresh memory: exact match {m['exact_match']:.2f} vs {fr['exact_match']:.2f}, "
                   f"character accuracy {m['char_accuracy']:.2f} vs {fr['char_accuracy']:.2f}")
    return RecallResult(
        settings={"seed": seed, "context": context, "facts": N, "bytes_shown": len(shown)},
        model={"memory": model.cfg.memory.kind, "slots": model.cfg.memory.slots, "block_size": B},
        facts=rows, summary=summary, context_influence=ctx,
        seconds=time.perf_counter() - t0, verdict=verdict,
    )
