"""Operations the recall experiments share: write a text into memory, score and complete a fact.

Everything is batched over facts: row i of every tensor belongs to fact i (or to one memory
instance), so an experiment over 16 facts costs a handful of forward passes, not hundreds.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from imm_cli.data import encode
from imm_cli.facts import MID_LINE, Fact
from imm_cli.memory import State
from imm_cli.model import GPT


def as_ids(texts: list[bytes], device) -> torch.Tensor:
    """Equal-length byte strings -> (b n) long tensor."""
    n = {len(t) for t in texts}
    assert len(n) == 1, f"rows must have equal length, got {sorted(n)}"
    arr = np.frombuffer(b"".join(texts), dtype=np.uint8).reshape(len(texts), -1)
    return torch.from_numpy(arr.astype(np.int64)).to(device)


def repeat_state(model: GPT, state: State | None, times: int) -> State | None:
    """Each memory instance repeated `times` times, consecutively (row i -> rows i*times..), for
    reading only (the memory's `read_only` form: no empty budget copied)."""
    if state is None:
        return None
    return {k: v.repeat_interleave(times, dim=0) for k, v in model.memory.read_only(state).items()}


@torch.no_grad()
def write_text(model: GPT, state: State | None, ids: torch.Tensor, prev: torch.Tensor | None = None):
    """Present (b L) bytes once, segment by segment, memory updates on. Returns (state, last bytes).

    The next byte of each position is known inside the text (it is the write's value); the last
    position's next byte is not, so it is not written.
    """
    B = model.cfg.block_size
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -1)], dim=1)
    for s in range(0, ids.shape[1], B):
        x = ids[:, s : s + B]
        # after the first write the state is this loop's own: later writes may update it in place
        state = model(x, targets=targets[:, s : s + B], state=state, prev=prev, reuse_state=s > 0).state
        prev = x
    return state, prev


def text_window(text: np.ndarray, length: int, rng: random.Random) -> bytes:
    """`length` bytes of real text starting at a line start (random place)."""
    for _ in range(50):
        start = rng.randrange(0, len(text) - length - 200)
        nl = text[start : start + 200].tobytes().find(b"\n")
        if nl >= 0:
            start += nl + 1
            break
    return text[start : start + length].tobytes()


def haystack(text: np.ndarray, fact: Fact | None, length: int, depth: float, rng: random.Random,
             placement: str = "line") -> bytes:
    """`length` bytes of real text with the fact once at `depth` (0 = start, 1 = end): as a line of
    its own ("line"), or inside a line of running text, after a word and before the next ("prose")."""
    if fact is None:
        return text_window(text, length, rng)
    body = fact.text.encode()
    piece = b"\n" + body + b"\n" if placement == "line" else body + b" "
    filler = text_window(text, max(length - len(piece), 0), rng)
    at = int(round(depth * len(filler)))
    if placement == "line":
        if 0 < at < len(filler):  # move to a line start so the fact reads as its own line
            nl = filler.rfind(b"\n", 0, at)
            at = nl + 1 if nl >= 0 else at
    else:  # after a space that follows a word: other words precede the fact on its line
        spaces = [m.end() for m in MID_LINE.finditer(filler)]
        if spaces:
            at = min(spaces, key=lambda p: abs(p - at))
        else:
            filler, at = b"and so " + filler[7:], 7
    return (filler[:at] + piece + filler[at:])[:max(length, len(piece))]


def _mid_line(text: np.ndarray, k: int, rng: random.Random) -> bytes:
    """k bytes of real text that end inside a line, just after a word and a space (>= 16 bytes of its line)."""
    for _ in range(200):
        w = text_window(text, k + 80, rng)
        ends = [m.end() for m in MID_LINE.finditer(w) if m.end() >= k and b"\n" not in w[m.end() - 16:m.end()]]
        if ends:
            e = ends[0]
            return w[e - k:e]
    if k < 16:
        return b" " * k
    return text_window(text, k, rng)[:k - 16].replace(b"\n", b" ") + b" and so he said "  # 16 bytes


def cue_prompt(text: np.ndarray, fact: Fact, length: int, rng: random.Random, before: bytes = b"",
               placement: str = "line") -> bytes:
    """`before` + other real text + the cue, exactly `length` bytes: a new context ending in the cue,
    at the start of a line ("line") or after other words on its line ("prose")."""
    cue = fact.cue.encode()
    tail = b"\n" + cue if placement == "line" else cue
    k = length - len(tail) - len(before)
    if k < 0:
        raise ValueError("prompt too short for its content")
    if not k:
        return before + tail
    return before + (text_window(text, k, rng) if placement == "line" else _mid_line(text, k, rng)) + tail


@torch.no_grad()
def score_rests(model: GPT, state: State | None, prompts: torch.Tensor, rests: list[bytes]) -> dict[str, torch.Tensor]:
    """Teacher-forced scores of each rest after its prompt (memory frozen, read on).

    prompts (b P); rests: b byte strings. Returns per-row loss per byte, greedy byte accuracy,
    and the next-byte log-probabilities at every rest position (for divergences).
    """
    b, P = prompts.shape
    R = max(len(r) for r in rests)
    rest_ids = torch.full((b, R), 0, dtype=torch.long, device=prompts.device)
    mask = torch.zeros((b, R), dtype=torch.bool, device=prompts.device)
    for i, r in enumerate(rests):
        rest_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    x = torch.cat([prompts, rest_ids], dim=1)[:, :-1]
    logits = window_logits(model, state, x)[:, P - 1 :]  # predictions of the rest bytes
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, rest_ids[..., None]).squeeze(-1)
    hit = (logits.argmax(-1) == rest_ids) & mask
    n = mask.sum(1).clamp(min=1)
    return {
        "loss_per_byte": (nll * mask).sum(1) / n,
        "char_accuracy": hit.sum(1) / n,
        "logp": logp,
        "mask": mask,
    }


@torch.no_grad()
def window_logits(model: GPT, state: State | None, x: torch.Tensor) -> torch.Tensor:
    """Logits of every position of x (b L), memory read, never written. Past the block size, windows
    slide by half a block, as generation re-primes: every position sees at least half a block."""
    B = model.cfg.block_size
    L = x.shape[1]
    if L <= B:
        return model(x, state=state, write=False).logits
    parts, done = [model(x[:, :B], state=state, write=False).logits], B
    while done < L:
        end = min(done + B // 2, L)
        start = end - B
        parts.append(model(x[:, start:end], state=state, prev=x[:, :start], write=False).logits[:, done - start:])
        done = end
    return torch.cat(parts, dim=1)


@torch.no_grad()
def complete(model: GPT, state: State | None, prompts: torch.Tensor, n: int) -> list[bytes]:
    """Greedy completion of n bytes after each prompt (KV cache, memory read, never written)."""
    out = model.generate(prompts, n, state=state)
    return [bytes(row.tolist()) for row in out.cpu()]


def exact_matches(generated: list[bytes], rests: list[bytes]) -> list[bool]:
    return [g[: len(r)] == r for g, r in zip(generated, rests)]


@torch.no_grad()
def recall_at_1(model: GPT, state: State | None, prompts: torch.Tensor, rests: list[bytes], rows: int = 1024,
                truth: list[int] | None = None) -> torch.Tensor:
    """Row i: is its fact's true rest (rests[truth[i]]; by default fact i's) the lowest-loss (per
    byte) rest among all facts' rests?

    Each prompt is run once into a KV cache; the N candidate rests then continue from it. Prompts go
    in chunks of at most `rows` (prompt, candidate) pairs, so 128 facts need no 16,384-row memory state.
    """
    C, N = prompts.shape[0], len(rests)
    truth_t = torch.tensor(list(range(C)) if truth is None else truth, device=prompts.device)
    chunk = max(1, rows // N)
    return torch.cat([_recall_at_1_rows(model, None if state is None else {k: v[i:i + chunk] for k, v in state.items()},
                                        prompts[i:i + chunk], rests, truth_t[i:i + chunk]) for i in range(0, C, chunk)])


def _recall_at_1_rows(model: GPT, state: State | None, prompts: torch.Tensor, rests: list[bytes], truth: torch.Tensor) -> torch.Tensor:
    """recall_at_1 for a chunk of prompts whose true rests are rests[truth] (every fact's rest is a candidate)."""
    C, P = prompts.shape
    N = len(rests)
    R = max(len(r) for r in rests)
    if P + R - 1 > model.cfg.block_size:  # past the window: score every (prompt, rest) pair directly
        losses = torch.stack([score_rests(model, state, prompts, [r] * C)["loss_per_byte"] for r in rests], dim=1)
        return losses.argmin(dim=1) == truth
    cache = model.new_cache(C)
    last = model.decode(prompts, cache, state)[:, -1]  # predicts rest byte 0
    cache.repeat_interleave(N)
    rest_ids = torch.zeros((N, R), dtype=torch.long, device=prompts.device)
    lengths = torch.tensor([len(r) for r in rests], device=prompts.device)
    for j, r in enumerate(rests):
        rest_ids[j, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    cand = rest_ids.repeat(C, 1)  # row i*N + j: prompt i, fact j's rest
    big_prompts = prompts.repeat_interleave(N, dim=0)
    logits = model.decode(cand[:, :-1], cache, repeat_state(model, state, N), prev=big_prompts)
    logits = torch.cat([last.repeat_interleave(N, dim=0)[:, None], logits], dim=1)  # (C*N, R, vocab)
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, cand[..., None]).squeeze(-1)
    mask = torch.arange(R, device=prompts.device)[None, :] < lengths.repeat(C)[:, None]
    loss = ((nll * mask).sum(1) / mask.sum(1)).view(C, N)
    return loss.argmin(dim=1) == truth


def encode_rests(facts: list[Fact]) -> list[bytes]:
    return [bytes(encode(f.rest)) for f in facts]
