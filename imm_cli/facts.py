"""Facts for the recall experiments: one per line, the cue is the first two words."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from imm_cli.data import read_text_file
from imm_cli.errors import InputError

# a space that follows a word: what comes after it sits inside a line of running text (the "prose"
# placement of a fact or a cue, for the curriculum and the experiments alike)
MID_LINE = re.compile(rb"[^\s] ")
PLACEMENTS = ("line", "prose")  # a fact (or a cue) on a line of its own, or inside a line of running text

CUE_WORDS = 2
LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Fact:
    text: str  # the whole fact
    cue: str  # the first two whitespace-separated words
    rest: str  # everything after the cue, with its leading space: cue + rest == text

    @classmethod
    def from_text(cls, line: str) -> "Fact":
        text = line.strip()
        words = text.split()
        if len(words) <= CUE_WORDS:
            raise ValueError(f"a fact needs at least {CUE_WORDS + 1} words: {text!r}")
        # cue ends where the second word ends (keeping the original spacing inside the cue)
        pos = 0
        for w in words[:CUE_WORDS]:
            pos = text.index(w, pos) + len(w)
        return cls(text=text, cue=text[:pos], rest=text[pos:])

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def cue_notes(facts: list[Fact]) -> list[str]:
    """Pairs of facts a completion cannot tell apart: one cue that begins another ("Queen Victoria"
    and "Queen Victoria,"), so cued with the shorter one, the other fact's rest is a fair
    continuation. Noted, not refused: the figures stand, read with that in mind."""
    return [f"fact {i + 1}'s cue {a.cue!r} begins fact {j + 1}'s cue {b.cue!r}: cued with it, a completion "
            f"from fact {j + 1} counts as a miss" for i, a in enumerate(facts) for j, b in enumerate(facts)
            if i != j and b.cue.startswith(a.cue)]


def load_facts(path: str | os.PathLike[str], max_bytes: int | None = None) -> list[Fact]:
    """Facts from a UTF-8 file: blank lines and ``#`` comments ignored; one-line InputError otherwise."""
    name = os.fspath(path)
    text = read_text_file(name, what="facts file").removeprefix("\ufeff")  # a UTF-8 BOM is no part of the first cue
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    # lines end at \n, \r\n or \r only (as an editor numbers them): str.splitlines would also cut a
    # fact at a form feed, NEL or U+2028 inside it, silently making two facts of one
    for lineno, raw in enumerate(LINE_BREAK.split(text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line.split()) <= CUE_WORDS:
            raise InputError(
                f"facts file {name}: line {lineno} has fewer than {CUE_WORDS + 1} words "
                f"(a two-word cue and the rest to recall)"
            )
        fact = Fact.from_text(line)
        if fact.cue in seen:
            raise InputError(
                f"facts file {name}: duplicate cue {fact.cue!r} on lines {seen[fact.cue]} and {lineno}"
            )
        if max_bytes is not None and fact.nbytes > max_bytes:
            raise InputError(
                f"facts file {name}: fact on line {lineno} is {fact.nbytes} bytes; "
                f"this model holds at most {max_bytes}"
            )
        seen[fact.cue] = lineno
        facts.append(fact)
    if not facts:
        raise InputError(f"facts file {name} holds no facts (only blank lines or # comments)")
    return facts
