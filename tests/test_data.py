"""Byte tokens, the embedded corpus, checked text files and episode sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imm_cli.data import (
    DEFAULT_CORPUS_NAME,
    Corpus,
    decode,
    encode,
    load_corpus,
    load_default_corpus,
    read_text_file,
    sample_episodes,
)
from imm_cli.errors import InputError


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip(text):
    b = encode(text)
    assert b.dtype == np.uint8
    assert decode(b) == text
    assert decode(torch.from_numpy(b.astype(np.int64))) == text
    assert decode(b.tolist()) == text
    assert decode(text.encode("utf-8")) == text


def test_decode_invalid_bytes_gives_replacement_char():
    assert decode(bytes([0x61, 0xFF, 0x62])) == "a\ufffdb"
    assert decode([0xE2, 0x82]) == "\ufffd"


def test_embedded_corpus():
    text = load_default_corpus()
    assert len(text.encode("utf-8")) > 1_000_000
    assert text.isascii()
    assert "ROMEO:" in text and "HAMLET:" in text
    assert "**" not in text and "#" not in text
    assert load_default_corpus() is text  # cached


def test_load_corpus_split_and_determinism(tmp_path):
    data = ("All the world's a stage,\nAnd all the men and women merely players.\n" * 200).encode()
    p = tmp_path / "d.txt"
    p.write_bytes(data)
    c = load_corpus(str(p))
    assert isinstance(c, Corpus) and c.source == str(p)
    assert c.train.dtype == np.uint8 and c.val.dtype == np.uint8
    assert len(c.train) == int(len(data) * 0.9)
    assert len(c.train) + len(c.val) == len(data)
    assert bytes(c.train) + bytes(c.val) == data
    c2 = load_corpus(str(p))
    assert np.array_equal(c.train, c2.train) and np.array_equal(c.val, c2.val)


def test_load_default_corpus_split():
    c = load_corpus(None)
    assert c.source == DEFAULT_CORPUS_NAME
    n = len(c.train) + len(c.val)
    assert len(c.train) == int(n * 0.9)


def test_load_corpus_too_small(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text("tiny text\n" * 50)
    with pytest.raises(InputError, match="too small"):
        load_corpus(str(p))


@pytest.mark.parametrize("segments,block", [(1, 16), (3, 64), (4, 7)])
def test_sample_episodes_shapes_and_shift(segments, block):
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    g = torch.Generator().manual_seed(1)
    x, y = sample_episodes(data, 5, segments, block, g)
    assert x.shape == y.shape == (5, segments, block)
    assert x.dtype == y.dtype == torch.int64
    src = torch.from_numpy(data).long()
    for i in range(5):
        flat_x, flat_y = x[i].reshape(-1), y[i].reshape(-1)
        # find the start: consecutive text, y is the next byte of x in the source
        starts = [s for s in range(len(data) - segments * block) if torch.equal(src[s : s + segments * block], flat_x)]
        assert starts, "episode is not consecutive source text"
        s = starts[0]
        assert torch.equal(flat_y, src[s + 1 : s + 1 + segments * block])
    if segments > 1:
        assert torch.equal(y[:, :-1, -1], x[:, 1:, 0])


def test_sample_episodes_reproducible():
    data = encode("abcdefghij" * 100)
    a = sample_episodes(data, 4, 2, 8, torch.Generator().manual_seed(7))
    b = sample_episodes(data, 4, 2, 8, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- read_text_file errors


def test_read_text_file_ok(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_text("héllo\n", encoding="utf-8")
    assert read_text_file(p) == "héllo\n"


def test_read_text_file_missing(tmp_path):
    with pytest.raises(InputError, match=r"data file .*nope\.txt does not exist"):
        read_text_file(tmp_path / "nope.txt")


def test_read_text_file_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_text_file(tmp_path)


def test_read_text_file_empty(tmp_path):
    p = tmp_path / "e.txt"
    p.write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        read_text_file(p)


def test_read_text_file_nul(tmp_path):
    p = tmp_path / "b.bin"
    p.write_bytes(b"abc\x00def")
    with pytest.raises(InputError, match="binary"):
        read_text_file(p)


def test_read_text_file_not_utf8_reports_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"x" * 1234 + b"\xe9t\xe9")
    with pytest.raises(InputError, match=r"latin\.txt is not UTF-8 \(invalid byte at offset 1234\)"):
        read_text_file(p)


def test_read_text_file_oversize(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("a" * 101)
    with pytest.raises(InputError, match="too large"):
        read_text_file(p, max_bytes=100)


def test_error_messages_are_one_line(tmp_path):
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(InputError) as ei:
            read_text_file(bad, what="facts file")
        assert "\n" not in str(ei.value) and str(ei.value).startswith("facts file ")


@pytest.mark.parametrize("taken", [0, 1, 5, 8, 9, 16, 19])
def test_training_batches_resume_mid_draw_and_are_drawn_as_one_stream(taken):
    """Batches are drawn BATCH_BUFFER at a time; a state saved after any number taken resumes on the
    very next batch (the generators before the last draw, and how many of it were taken), and a
    state from before batches were drawn ahead (no "taken") means none were."""
    from imm_cli.config import ModelConfig, TrainConfig
    from imm_cli.data import load_corpus
    from imm_cli.train import BATCH_BUFFER, Batches

    corpus = load_corpus(None)
    mcfg, tcfg = ModelConfig(block_size=32), TrainConfig(batch_size=8, max_gap=4)

    def fresh() -> Batches:
        return Batches(corpus, mcfg, tcfg, segments=4, seed=7, max_gap=4)

    a = fresh()
    for _ in range(taken):
        a.next()
    saved = a.state()
    assert saved["taken"] == (taken - 1) % BATCH_BUFFER + 1 if taken else saved["taken"] == 0
    expect = [a.next() for _ in range(BATCH_BUFFER + 3)]
    b = fresh()
    b.load_state(saved)
    for (x, y, gap), (x2, y2, gap2) in zip(expect, [b.next() for _ in range(BATCH_BUFFER + 3)]):
        assert gap == gap2 and torch.equal(x, x2) and torch.equal(y, y2)
    # the same stream as drawing one batch at a time from the same generators
    one = fresh()
    drawn = [one._draw() for _ in range(taken + 2)]
    c = fresh()
    taken_now = [c.next() for _ in range(taken + 2)]
    assert all(torch.equal(p[0], q[0]) and p[2] == q[2] for p, q in zip(drawn, taken_now))
    # an older state, saved between steps with nothing drawn ahead
    old = fresh()
    st = {"gen": old.gen.get_state(), "rng": [v if not isinstance(v, tuple) else list(v) for v in old.rng.getstate()]}
    d = fresh()
    d.load_state(st)
    assert torch.equal(d.next()[0], fresh().next()[0])
