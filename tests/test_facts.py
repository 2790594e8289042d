"""Facts files: parsing and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from imm_cli.errors import InputError
from imm_cli.facts import Fact, load_facts

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "facts.txt"


def test_fact_from_text():
    f = Fact.from_text("Python was created by Guido van Rossum.")
    assert f.cue == "Python was"
    assert f.rest == " created by Guido van Rossum."
    assert f.cue + f.rest == f.text


def test_fact_from_text_strips_and_keeps_identity():
    f = Fact.from_text("  Bitcoin launched in January 2009.  \n")
    assert f.text == "Bitcoin launched in January 2009."
    assert f.cue + f.rest == f.text and f.rest.startswith(" ")


def write(tmp_path, text: str | bytes) -> Path:
    p = tmp_path / "facts.txt"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_load_facts_skips_blank_and_comments(tmp_path):
    p = write(tmp_path, "# comment\n\nWikipedia went online in 2001.\n   \nNeptune was discovered in 1846.\n")
    facts = load_facts(p)
    assert [f.cue for f in facts] == ["Wikipedia went", "Neptune was"]


@pytest.mark.parametrize("inner", ["\x0c", "\x85", "\u2028", "\u2029", "\x1c"])
def test_only_newlines_end_a_fact(tmp_path, inner):
    """A form feed, NEL or Unicode line separator inside a fact (or a comment) is not a line break:
    str.splitlines would cut the fact in two and number the lines unlike an editor."""
    p = write(tmp_path, f"# a comment{inner}with a tail\r\nVolta invented the battery{inner}in 1800.\rNeptune was\n")
    with pytest.raises(InputError, match="line 3 has fewer than 3 words"):
        load_facts(p)
    p = write(tmp_path, f"# a comment{inner}with a tail\r\nVolta invented the battery{inner}in 1800.\rNeptune was found in 1846.\n")
    facts = load_facts(p)
    assert [f.cue for f in facts] == ["Volta invented", "Neptune was"]
    assert facts[0].rest == f" the battery{inner}in 1800."


def test_example_facts_file():
    facts = load_facts(EXAMPLES)
    assert len(facts) >= 12
    assert len({f.cue for f in facts}) == len(facts)
    for f in facts:
        assert f.text.isascii() and 25 <= len(f.text) <= 60
        assert any(ch.isdigit() for ch in f.text) or any(w[0].isupper() for w in f.rest.split())


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("# only a comment\n\n", "no facts"),
        ("Wikipedia went online in 2001.\nToo short\n", r"line 2 has fewer than 3 words"),
        ("Pluto was small.\nNeptune was big.\nPluto was reclassified in 2006.\n", r"duplicate cue 'Pluto was' on lines 1 and 3"),
        (b"Pluto was \xff small.\n", r"not UTF-8 \(invalid byte at offset 10\)"),
        (b"Pluto was\x00 small.\n", "binary"),
        (b"", "is empty"),
    ],
)
def test_load_facts_errors(tmp_path, content, pattern):
    p = write(tmp_path, content)
    with pytest.raises(InputError, match=pattern) as ei:
        load_facts(p)
    assert "\n" not in str(ei.value) and "facts file" in str(ei.value)


def test_load_facts_too_long(tmp_path):
    p = write(tmp_path, "# c\n\nPython was created by Guido van Rossum in the Netherlands long ago.\n")
    with pytest.raises(InputError, match=r"fact on line 3 is 67 bytes; this model holds at most 50"):
        load_facts(p, max_bytes=50)
    assert len(load_facts(p, max_bytes=67)) == 1


def test_load_facts_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"facts file .*missing\.txt does not exist"):
        load_facts(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="is a directory"):
        load_facts(tmp_path)


def test_a_cue_that_begins_another_is_noted():
    """Found by a new-user pass: "Queen Victoria" beside "Queen Victoria," made a fair completion a miss, silently."""
    from imm_cli.facts import cue_notes

    facts = [Fact.from_text("Queen Victoria ruled for 63 years."), Fact.from_text("Queen Victoria, empress of India, died in 1901."),
             Fact.from_text("Neptune was discovered in 1846.")]
    notes = cue_notes(facts)
    assert len(notes) == 1 and "fact 1's cue 'Queen Victoria' begins fact 2's cue 'Queen Victoria,'" in notes[0]
    assert cue_notes(load_facts(EXAMPLES)) == []
