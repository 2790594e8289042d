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
from imm_cli.facts import MID_LINE, Fact

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


# each syllable's probability as invent_word draws it: onset and vowel uniform, and with probability
# 0.35 a coda drawn from CODAS (whose first, "", is also the word's lot the other 0.65)
_SYLLABLE_CUM = tuple(
    np.cumsum([(0.65 * (c == "") + 0.35 / len(CODAS)) / (len(ONSETS) * len(VOWELS))
               for o in ONSETS for v in VOWELS for c in CODAS]).tolist())


def invent_word(rng: random.Random, capitalise: bool = True) -> str:
    """2 or 3 syllables (open ones more common, which keeps the words pronounceable), drawn in one
    call: the curriculum invents about twenty words per training step."""
    n = MIN_SYLLABLES + int(rng.random() * (MAX_SYLLABLES - MIN_SYLLABLES + 1))
    word = "".join(rng.choices(SYLLABLES, cum_weights=_SYLLABLE_CUM, k=n))
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
    return " ".join(rng.choices(words, k=rng.randint(lo, hi)))


class _Fields(dict):
    """A template's fields, each drawn only when the template names it (format_map asks for it)."""

    def __init__(self, rng: random.Random, words: tuple[str, ...]) -> None:
        super().__init__()
        self.rng, self.words = rng, words

    def __missing__(self, key: str) -> str:
        rng = self.rng
        if key in ("N", "S", "P", "Q"):
            value = invent_word(rng)
        elif key == "n":
            value = invent_word(rng, capitalise=False)
        elif key == "Y":
            value = str(rng.randint(1000, 2099))
        elif key == "K":
            value = str(rng.randint(2, 9999))
        elif key == "w":
            value = _words(rng, self.words, 2, 5)
        elif key == "w2":
            value = _words(rng, self.words, 1, 2)
        else:
            raise KeyError(key)
        self[key] = value
        return value


def make_fact(rng: random.Random, max_bytes: int = MAX_FACT_BYTES, min_bytes: int = MIN_FACT_BYTES,
              words: tuple[str, ...] = ()) -> Fact:
    """One synthetic fact of ``min_bytes``..``max_bytes`` bytes (rejection sampling).

    With ``words`` (real words of the training text), half the facts use WORD_TEMPLATES.
    """
    for _ in range(10_000):
        templates = WORD_TEMPLATES if words and rng.random() < 0.5 else TEMPLATES
        text = rng.choice(templates).format_map(_Fields(rng, words))
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

    def sample_many(self, k: int, max_bytes: int = MAX_FACT_BYTES, room: int | None = None) -> list[Fact]:
        """k facts with distinct cues; with `room`, only those before the first that would take
        their texts (each + 2 bytes for its line breaks) past `room` bytes (the first always stays):
        the same facts as cutting the k afterwards, without inventing the ones that would be cut."""
        facts: list[Fact] = []
        cues: set[str] = set()
        used = 0
        while len(facts) < k:
            f = make_fact(self.rng, max_bytes=max_bytes, words=self.words)
            if f.cue in cues:
                continue
            if room is not None and facts and used + len(f.text) + 2 > room:
                break
            cues.add(f.cue)
            facts.append(f)
            used += len(f.text) + 2
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


_LINE_START = re.compile(rb"\n")


def _splice(chunk: bytes, items: list[bytes], placements: list[str], rng: random.Random,
            early: bool = False) -> tuple[bytes, list[int]]:
    """Insert each item into chunk: "line" right after a newline (the item then ends its own line),
    "prose" right after a space inside a line (words before and after it on the same line).
    Returns the text and the offset of each item in it. `early`: all items in the first quarter."""
    span = max(1, len(chunk) // 4) if early else len(chunk)
    head = chunk[:span]
    # "prose": after a space that follows a word, so the item never starts its line
    where = {"line": _LINE_START, "prose": MID_LINE}
    cands = {p: [m.end() for m in where[p].finditer(head)] for p in set(placements)}
    points = [rng.choice(cands[p]) if cands[p] else 0 for p in placements]
    order = sorted(range(len(items)), key=lambda i: points[i])
    out, offsets, pos, length = [], [0] * len(items), 0, 0
    for i in order:
        at = points[i]
        out.append(chunk[pos:at])
        length += at - pos
        item = items[i] + (b"\n" if placements[i] == "line" else b" ")
        if at == 0 and placements[i] == "line":
            item = b"\n" + item  # no newline to follow: start a line
            offsets[i] = length + 1
        else:
            offsets[i] = length
        out.append(item)
        length += len(item)
        pos = at
    out.append(chunk[pos:])
    return b"".join(out), offsets


def curriculum_episode(
    text: np.ndarray, segments: int, block: int, rng: random.Random, max_facts: int = 8,
    prose: float = 0.5,
) -> CurriculumEpisode:
    """One recall-curriculum episode (see the module docstring).

    One stream of ``segments * block + 1`` bytes of consecutive corpus text, cut into x and y. The
    write region is every segment but the last (for one segment: its first half): 1 to
    ``max_facts`` facts are spliced into it, all in its first quarter (half the episodes: facts
    long before their cues) or anywhere in it. The last segment (for one segment: the rest) repeats
    the facts that fit, in random order. Each fact and each cue is placed on its own line or, with
    probability ``prose``, inside a line of running text (the cue then follows other words).
    """
    if segments < 1 or block < 1 or max_facts < 1:
        raise ValueError("segments, block and max_facts must be positive")
    total = segments * block + 1
    if len(text) < total + 1:
        raise InputError(f"text of {len(text):,} bytes is too short for {segments} segments of {block} bytes")
    write_cap = (segments - 1) * block if segments >= 2 else block // 2
    recall_cap = total - write_cap
    max_fact = min(MAX_FACT_BYTES, max(40, min(write_cap // 2, recall_cap - 3)))

    synth = SyntheticFacts(rng, words=corpus_words(text))
    # the facts that leave at least half the write region to text (always one)
    written = synth.sample_many(rng.randint(1, max_facts), max_bytes=max_fact, room=write_cap // 2)
    used = sum(len(f.text) + 2 for f in written)
    cued, rused = [], 0
    for f in rng.sample(written, len(written)):  # recall all that fit the last segment (always one)
        need = len(f.text) + 2
        if cued and rused + need > recall_cap - 1:
            break
        cued.append(f)
        rused += need

    def place() -> str:
        return "prose" if rng.random() < prose else "line"

    start = rng.randrange(0, len(text) - total)
    corpus = text[start : start + total].tobytes()
    items = [f.text.encode("ascii") for f in written]
    chunk_len = max(0, write_cap - used)
    pre, _ = _splice(corpus[:chunk_len], items, [place() for _ in written], rng, early=rng.random() < 0.5)
    # exactly the write region: short by the newlines not needed, continue the text; a fact cut at
    # its end is not cued (checked below)
    pre = (pre + corpus[chunk_len:chunk_len + write_cap - len(pre)])[:write_cap]
    rest_len = total - len(pre)
    cue_items = [f.text.encode("ascii") for f in cued]
    inserted = sum(len(c) + 2 for c in cue_items)
    from_ = len(corpus) - max(0, rest_len - inserted)
    tail, offsets = _splice(corpus[from_:], cue_items, [place() for _ in cued], rng)
    stream = (pre + tail + corpus[chunk_len:])[:total]  # (the filler after the tail is never reached in practice)
    # cued facts in stream order; a fact whose written copy was cut off, or whose cue ran past the
    # end, is not cued (its answer would not be in memory, or not in the episode)
    kept = sorted(((len(pre) + off, f) for off, f in zip(offsets, cued)
                   if len(pre) + off + len(f.text) <= total and f.text.encode() in stream[:len(pre)]), key=lambda t: t[0])
    assert len(stream) == total

    arr = np.frombuffer(stream, dtype=np.uint8).astype(np.int64)
    mask = np.zeros(total - 1, dtype=bool)
    for off, f in kept:
        a = off + len(f.cue) - 1  # y index j predicts stream byte j + 1
        b = off + len(f.text) - 1
        mask[max(0, a) : max(0, min(b, total - 1))] = True
    return CurriculumEpisode(
        x=arr[:-1].reshape(segments, block),
        y=arr[1:].reshape(segments, block),
        answer_mask=mask.reshape(segments, block),
        written=written,
        cued=[f for _, f in kept],
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
