"""Why a recall missed: each wrong greedy completion, classified at its first wrong byte.

At that byte the prompt and the rest generated correctly so far are the context, the fact's own
byte is the target. One cause per miss, the first that holds:
  window       the model, run teacher-forced on that context's last window, predicts the right
               byte: the miss came from generation re-priming its window (not from the memory);
  outvoted     the memory's read raised the right byte (at least doubled its probability over the
               same model with the read switched off, and raised it more than the byte chosen),
               yet the model preferred another byte;
  not_in_text  the written text never held this context followed by the byte, as far back as the
               memory's exact entries are keyed (`Memory.exact_context` bytes): the cue's
               surroundings, or the rest so far, differ from the fact's within the key's reach;
  not_kept     the written text held it, but the memory no longer holds that entry (retention);
  not_read     the memory holds it, but its read did not raise the byte, or raised the chosen
               wrong byte more (another entry, e.g. another fact's with a similar context, or
               "nothing matches", won the read).
Memories without exact entries (`exact_context` None) stop at "not_read", which then also
covers what the two before it would say.
"""

from __future__ import annotations

import math

import torch

from imm_cli.model import GPT

CAUSES = ("window", "outvoted", "not_in_text", "not_kept", "not_read")
RAISED = math.log(2)  # "the read raised the byte": at least doubled its probability
EXAMPLES = 8  # misses kept verbatim per classification


def first_wrong(generated: bytes, rest: bytes) -> int | None:
    """Index of the first byte where the greedy completion leaves the true rest (None: exact)."""
    for j, r in enumerate(rest):
        if j >= len(generated) or generated[j] != r:
            return j
    return None


@torch.no_grad()
def classify(model: GPT, state: dict, prompts: torch.Tensor, rests: list[bytes], generated: list[bytes],
             texts: list[bytes], cues: list[str] | None = None) -> dict:
    """Counts of each cause over the rows whose completion missed, and a few examples.

    state: the memory read for each row (b rows); texts: what was written into each row's memory
    (one text shared by every row: a list of one).
    """
    mem, B = model.memory, model.cfg.block_size
    K = mem.exact_context
    counts = dict.fromkeys(CAUSES, 0)
    examples = []
    for i, (gen, rest) in enumerate(zip(generated, rests)):
        j = first_wrong(gen, rest)
        if j is None:
            continue
        ctx, target = bytes(prompts[i].tolist()) + rest[:j], rest[j]
        ids = torch.tensor(list(ctx), dtype=torch.long, device=prompts.device)[None]
        x, prev = ids[:, -B:], ids[:, :-B]
        row = {k: v[i:i + 1] for k, v in state.items()}
        with_read = model(x, state=row, prev=prev, write=False).logits[0, -1].log_softmax(-1)
        with model.memory_mode(ablated=True):
            without = model(x, state=row, prev=prev, write=False).logits[0, -1].log_softmax(-1)
        chosen = int(with_read.argmax())
        gain = with_read - without  # what the read did to each byte's log-probability
        if chosen == target:
            cause = "window"
        elif float(gain[target]) >= RAISED and float(gain[target]) > float(gain[chosen]):
            cause = "outvoted"
        elif K is None:
            cause = "not_read"
        elif ctx[-K:] + bytes([target]) not in texts[i if len(texts) > 1 else 0]:
            cause = "not_in_text"
        elif not bool(mem.holds(row, ids, torch.tensor([target], device=ids.device))[0]):
            cause = "not_kept"
        else:
            cause = "not_read"
        counts[cause] += 1
        if len(examples) < EXAMPLES:
            examples.append({"cue": cues[i] if cues else None, "expected": rest.decode("utf-8", "replace"),
                             "generated": gen[:len(rest)].decode("utf-8", "replace"), "first_wrong": j,
                             "cause": cause, "p_with_read": math.exp(float(with_read[target])),
                             "p_without_read": math.exp(float(without[target]))})
    return {"misses": sum(counts.values()), "rows": len(rests), "causes": counts, "examples": examples}


def summary_line(m: dict) -> str:
    """One line: how many rows missed, and the count of each cause that occurred."""
    causes = ", ".join(f"{c.replace('_', ' ')} {m['causes'][c]}" for c in CAUSES if m["causes"][c])
    return f"{m['misses']} of {m['rows']} missed" + (f" (at the first wrong byte: {causes})" if causes else "")


def merge(parts: list[dict]) -> dict:
    """Several classifications (e.g. trials) as one: counts summed, examples of the first kept."""
    out = {"misses": 0, "rows": 0, "causes": dict.fromkeys(CAUSES, 0), "examples": []}
    for p in parts:
        out["misses"] += p["misses"]
        out["rows"] += p["rows"]
        for c in CAUSES:
            out["causes"][c] += p["causes"][c]
        out["examples"] += p["examples"][:EXAMPLES - len(out["examples"])]
    return out
