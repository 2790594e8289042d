"""Synthetic facts and a recall curriculum for training the memory's write and read paths.

A curriculum episode is ``segments`` consecutive blocks of real corpus text. Facts made of
invented words are written into the early segment(s); the middle segments are a gap of
plain corpus text; the last segment repeats some of those facts, each on its own line, so
that predicting the rest of a fact after its two-word cue needs what the memory stored.

The invented words come from a small syllable inventory (consonant-vowel syllables with a
few onset clusters and only the codas ``k r v z``). :func:`can_generate_word` decides, by
dynamic programming, whether a word can be built from that inventory, which lets the tests
prove that no evaluation fact (``examples/facts.txt``) can ever be generated: their
capitalised words (Python, Pluto, Bitcoin, ...) are not segmentable.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from imm_cli.errors import InputError
from imm_cli.facts import Fact

# ----------------------------------------------------------------------------- inventory

VOWELS = ("a", "e", "i", "o", "u")
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "dr", "kr", "tr", "zv", "gr")
CODAS = ("", "k", "r", "v", "z")
SYLLABLES: tuple[str, ...] = tuple(o + v + c for o in ONSETS for v in VOWELS for c in CODAS)
_SYLLABLE_SET = frozenset(SYLLABLES)
_MAX_SYLLABLE = max(len(s) for s in SYLLABLES)

MIN_SYLLABLES, MAX_SYLLABLES = 2, 3
MIN_FACT_BYTES, MAX_FACT_BYTES = 25, 70

# Templates: {N} first name, {S} surname, {P}/{Q} places, {n} a lowercase invented noun,
# {Y} a year, {K} a number. Every template starts with an invented word, or with "The"
# followed by an invented word, so every cue (the first two words) is novel.
TEMPLATES: tuple[str, ...] = (
    "{N} {S} was born in {Y}.",
    "{P} is the capital of {Q}.",
    "{N} {S} invented the {n} in {Y}.",
    "{N} {S} scored {K} points.",
    "The {n} of {P} is {K} metres tall.",
    "{N} {S} founded {P} in {Y}.",
    "The {n} was discovered by {N} {S} in {Y}.",
    "{P} has {K} inhabitants.",
    "{N} {S} won the {n} prize in {Y}.",
    "{P} joined the {n} league in {Y}.",
)


def can_generate_word(word: str) -> bool:
    """Whether ``word`` could be an invented word: all lowercase or Capitalised, and a
    concatenation of one or more syllables of the inventory (a superset of what
    :func:`invent_word` produces, which uses 2-3 syllables)."""
    if not word or not word.isascii() or not word.isalpha():
        return False
    if not (word.islower() or (word[0].isupper() and (len(word) == 1 or word[1:].islower()))):
        return False
    return _segmentable(word.lower())


@functools.lru_cache(maxsize=65536)
def _segmentable(w: str) -> bool:
    ok = [False] * (len(w) + 1)
    ok[0] = True
    for end in range(1, len(w) + 1):
        for start in range(max(0, end - _MAX_SYLLABLE), end):
            if ok[start] and w[start:end] in _SYLLABLE_SET:
                ok[end] = True
                break
    return ok[len(w)]


def invent_word(rng: random.Random, capitalise: bool = True) -> str:
    n = rng.randint(MIN_SYLLABLES, MAX_SYLLABLES)
    # open syllables are more common, which keeps the words pronounceable
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS if rng.random() < 0.35 else ("",)) for _ in range(n))
    return word.capitalize() if capitalise else word


# Templates whose middle is real words of the training text: their bytes are ones the language
# model has strong (and here wrong) expectations about, which teaches it to trust the memory
# over its prior. The first word is still invented, so the cue stays novel.
WORD_TEMPLATES: tuple[str, ...] = (
    "{N} {S} {w}.",
    "{N} {w} in {Y}.",
    "The {n} {w}.",
    "{P} {w} {K} {w2}.",
)
_WORD_RE = re.compile(rb"[a-z]{3,10}")
_WORD_CACHE: dict[tuple[int, int], tuple[str, ...]] = {}


def corpus_words(text: np.ndarray | None) -> tuple[str, ...]:
    """Lowercase words (3-10 letters, seen at least 3 times) of a training text, cached per array."""
    if text is None or len(text) == 0:
        return ()
    key = (text.__array_interface__["data"][0], len(text))
    if key not in _WORD_CACHE:
        counts: dict[bytes, int] = {}
        for m in _WORD_RE.finditer(text[: 2_000_000].tobytes()):
            counts[m.group()] = counts.get(m.group(), 0) + 1
        _WORD_CACHE[key] = tuple(sorted(w.decode() for w, c in counts.items() if c >= 3))
    return _WORD_CACHE[key]


def _words(rng: random.Random, words: tuple[str, ...], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def make_fact(rng: random.Random, max_bytes: int = MAX_FACT_BYTES, min_bytes: int = MIN_FACT_BYTES,
              words: tuple[str, ...] = ()) -> Fact:
    """One synthetic fact of ``min_bytes``..``max_bytes`` bytes (rejection sampling).

    With ``words`` (real words of the training text), half the facts use WORD_TEMPLATES.
    """
    for _ in range(10_000):
        if words and rng.random() < 0.5:
            text = rng.choice(WORD_TEMPLATES).format(
                N=invent_word(rng), S=invent_word(rng), P=invent_word(rng), n=invent_word(rng, capitalise=False),
                Y=str(rng.randint(1000, 2099)), K=str(rng.randint(2, 9999)),
                w=_words(rng, words, 2, 5), w2=_words(rng, words, 1, 2),
            )
            if min_bytes <= len(text) <= max_bytes:
                return Fact.from_text(text)
            continue
        template = rng.choice(TEMPLATES)
        text = template.format(
            N=invent_word(rng),
            S=invent_word(rng),
            P=invent_word(rng),
            Q=invent_word(rng),
            n=invent_word(rng, capitalise=False),
            Y=str(rng.randint(1000, 2099)),
            K=str(rng.randint(2, 9999)),
        )
        if min_bytes <= len(text) <= max_bytes:  # ASCII: characters == bytes
            return Fact.from_text(text)
    raise ValueError(f"no synthetic fact fits {min_bytes}..{max_bytes} bytes")


class SyntheticFacts:
    """A reproducible stream of synthetic facts: ``SyntheticFacts(seed)`` or ``SyntheticFacts(rng)``."""

    def __init__(self, seed_or_rng: int | random.Random | None = None, words: tuple[str, ...] = ()):
        self.rng = seed_or_rng if isinstance(seed_or_rng, random.Random) else random.Random(seed_or_rng)
        self.words = words

    def sample(self, max_bytes: int = MAX_FACT_BYTES) -> Fact:
        return make_fact(self.rng, max_bytes=max_bytes, words=self.words)

    def sample_many(self, k: int, max_bytes: int = MAX_FACT_BYTES) -> list[Fact]:
        """k facts with distinct cues."""
        facts: list[Fact] = []
        cues: set[str] = set()
        while len(facts) < k:
            f = make_fact(self.rng, max_bytes=max_bytes, words=self.words)
            if f.cue not in cues:
                cues.add(f.cue)
                facts.append(f)
        return facts

    def __iter__(self):
        while True:
            yield self.sample()


# ----------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class CurriculumEpisode:
    x: np.ndarray  # (segments, block) int64 input bytes
    y: np.ndarray  # (segments, block) int64 next bytes (x shifted by one, across segments)
    answer_mask: np.ndarray  # (segments, block) bool: y positions holding the rest of a cued fact
    written: list[Fact] = field(default_factory=list)  # facts inserted in the write region
    cued: list[Fact] = field(default_factory=list)  # facts recalled in the last segment, in order


def _insert_positions(chunk: bytes, k: int, rng: random.Random) -> list[int]:
    """k insertion points in chunk (1..len), preferring line starts, then word starts."""
    if not chunk:
        return [0] * k
    for sep in (b"\n", b" "):
        cands = [m.end() for m in re.finditer(re.escape(sep), chunk)]
        if cands:
            return sorted(rng.choice(cands) for _ in range(k))
    return sorted(rng.randint(1, len(chunk)) for _ in range(k))


def curriculum_episode(
    text: np.ndarray, segments: int, block: int, rng: random.Random, max_facts: int = 8
) -> CurriculumEpisode:
    """One recall-curriculum episode (see the module docstring).

    Layout in bytes (one stream of ``segments * block + 1`` bytes, cut into x and y):
    the write region is the first ``max(1, (segments - 1) // 2)`` segments (for one
    segment: the first half), corpus text with ``k`` in 1..max_facts facts inserted as
    lines; corpus text continues through the gap; the cued facts are written as lines,
    in random order, inside the last segment (for one segment: after the write region),
    surrounded by more corpus text. A fact may straddle a segment boundary.
    """
    if segments < 1 or block < 1 or max_facts < 1:
        raise ValueError("segments, block and max_facts must be positive")
    total = segments * block + 1
    if len(text) < total + 1:
        raise InputError(f"text of {len(text):,} bytes is too short for {segments} segments of {block} bytes")

    if segments >= 2:
        write_cap = max(1, (segments - 1) // 2) * block
        recall_lo = (segments - 1) * block
        recall_cap = total - recall_lo
    else:
        write_cap = block // 2
        recall_lo = 0
        recall_cap = total - write_cap
    max_fact = min(MAX_FACT_BYTES, max(40, min(write_cap, recall_cap) - 3))

    synth = SyntheticFacts(rng, words=corpus_words(text))
    facts = synth.sample_many(rng.randint(1, max_facts), max_bytes=max_fact)

    written: list[Fact] = []
    used = 0
    for f in facts:  # keep the facts that fit the write region (always at least one)
        need = len(f.text) + 2
        if written and used + need > write_cap - 1:
            break
        written.append(f)
        used += need

    cued_all = rng.sample(written, len(written))
    cued: list[Fact] = []
    rused = 1  # the newline before the first cued fact
    for f in cued_all:  # recall all that fit the last segment (always at least one)
        need = len(f.text) + 1
        if cued and rused + need > recall_cap:
            break
        cued.append(f)
        rused += need

    # corpus text, consecutive from a random start; facts are spliced in between its bytes
    start = rng.randrange(0, len(text) - total)
    corpus = text[start : start + total].tobytes()
    cpos = 0  # next unused corpus byte

    chunk_len = max(0, write_cap - used)
    chunk = corpus[:chunk_len]
    cpos = chunk_len
    pieces: list[bytes] = []
    fact_offsets: list[tuple[int, Fact]] = []  # (stream offset of fact text, fact), for cued facts
    pos = 0
    length = 0
    for at, f in zip(_insert_positions(chunk, len(written), rng), written):
        pieces.append(chunk[pos:at])
        length += at - pos
        pieces.append(b"\n" + f.text.encode("ascii") + b"\n")
        length += len(f.text) + 2
        pos = at
    pieces.append(chunk[pos:])
    length += len(chunk) - pos

    lo = max(recall_lo, length)
    hi = total - rused
    recall_at = rng.randint(lo, hi) if hi >= lo else lo
    gap = recall_at - length
    pieces.append(corpus[cpos : cpos + gap])
    cpos += gap
    length += gap
    recall = [b"\n"]
    length += 1
    for f in cued:
        fact_offsets.append((length, f))
        recall.append(f.text.encode("ascii") + b"\n")
        length += len(f.text) + 1
    pieces.extend(recall)
    stream = b"".join(pieces)
    if len(stream) < total:
        stream += corpus[cpos : cpos + total - len(stream)]
    stream = stream[:total]
    assert len(stream) == total

    arr = np.frombuffer(stream, dtype=np.uint8).astype(np.int64)
    mask = np.zeros(total - 1, dtype=bool)
    for off, f in fact_offsets:
        a = off + len(f.cue) - 1  # y index j predicts stream byte j + 1
        b = off + len(f.text) - 1
        mask[max(0, a) : max(0, min(b, total - 1))] = True
    return CurriculumEpisode(
        x=arr[:-1].reshape(segments, block),
        y=arr[1:].reshape(segments, block),
        answer_mask=mask.reshape(segments, block),
        written=written,
        cued=cued,
    )


def build_curriculum_episode(
    text: np.ndarray, segments: int, block: int, rng: random.Random, max_facts: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """x, y of shape (segments, block), int64 (see :func:`curriculum_episode`)."""
    ep = curriculum_episode(text, segments, block, rng, max_facts)
    return ep.x, ep.y


def build_curriculum_episode_masked(
    text: np.ndarray, segments: int, block: int, rng: random.Random, max_facts: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and the answer mask (bool, True where y is a byte of a cued fact's rest)."""
    ep = curriculum_episode(text, segments, block, rng, max_facts)
    return ep.x, ep.y, ep.answer_mask


def sample_curriculum(
    text: np.ndarray, n: int, segments: int, block: int, rng: random.Random, max_facts: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of n episodes as torch tensors: x, y (n, segments, block) int64 and the answer mask (bool)."""
    eps = [curriculum_episode(text, segments, block, rng, max_facts) for _ in range(n)]
    x = torch.from_numpy(np.stack([e.x for e in eps]))
    y = torch.from_numpy(np.stack([e.y for e in eps]))
    m = torch.from_numpy(np.stack([e.answer_mask for e in eps]))
    return x, y, m
