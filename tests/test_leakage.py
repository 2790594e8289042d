"""The evaluation facts never leak into training data, and the curriculum does what it says."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from imm_cli.curriculum import (
    SyntheticFacts,
    build_curriculum_episode,
    build_curriculum_episode_masked,
    can_generate_word,
    curriculum_episode,
    invent_word,
    make_fact,
    sample_curriculum,
)
from imm_cli.data import decode, load_corpus, load_default_corpus
from imm_cli.facts import load_facts

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = EXAMPLES_DIR / "facts.txt"
# tiny Shakespeare sits in shared/data/ beside the repository (../shared from its root), or inside it
REPO = Path(__file__).resolve().parents[1]
TINY_CANDIDATES = [REPO.parent / "shared" / "data" / "tinyshakespeare.txt", REPO / "shared" / "data" / "tinyshakespeare.txt"]
TINY = next((p for p in TINY_CANDIDATES if p.is_file()), TINY_CANDIDATES[0])


@pytest.fixture(scope="module", params=["facts.txt", "heldout_facts.txt", "many_facts.txt", "varied_facts.txt", "shared_phrase_facts.txt"])
def eval_facts(request):
    return load_facts(EXAMPLES_DIR / request.param)


@pytest.fixture(scope="module")
def train_text():
    return load_corpus(None).train


def test_eval_cues_not_in_embedded_corpus(eval_facts):
    text = load_default_corpus()
    for f in eval_facts:
        assert f.cue not in text, f.cue
        assert f.text not in text


@pytest.mark.skipif(not TINY.is_file(), reason=f"tiny Shakespeare is absent (looked for {TINY_CANDIDATES[0]} and {TINY_CANDIDATES[1]})")
def test_eval_cues_not_in_tinyshakespeare(eval_facts):
    text = TINY.read_text(encoding="utf-8")
    for f in eval_facts:
        assert f.cue not in text, f.cue


def test_can_generate_word_rules():
    rng = random.Random(0)
    for _ in range(2000):
        w = invent_word(rng, capitalise=rng.random() < 0.5)
        assert can_generate_word(w), w
    for bad in ("", "Zo-ra", "zoRa", "ZORA", "Zor4", "Lan", "Pluto", "Python"):
        assert not can_generate_word(bad), bad


def test_eval_words_cannot_be_generated(eval_facts):
    words = {w for f in eval_facts for w in re.findall(r"[A-Za-z]+", f.text) if w[0].isupper() and len(w) >= 4}
    assert len(words) >= 10  # the check below has something to bite on
    assert [w for w in words if can_generate_word(w)] == []
    # every cue starts with a non-generable word, or with "The" + a non-generable word
    for f in eval_facts:
        first, second = f.cue.split()
        assert not can_generate_word(first) or (first == "The" and not can_generate_word(second))


def test_synthetic_facts_never_contain_eval_facts(eval_facts):
    gen = SyntheticFacts(1234)
    cues = [f.cue for f in eval_facts]
    texts = [f.text for f in eval_facts]
    seen = []
    for _ in range(50_000):
        f = gen.sample()
        assert 25 <= len(f.text) <= 70 and f.cue + f.rest == f.text
        seen.append(f.text)
    blob = "\n".join(seen)
    for c in cues:
        assert c not in blob, c
    for t in texts:
        assert t not in blob


def test_synthetic_facts_reproducible():
    a = [SyntheticFacts(5).sample().text for _ in range(1)]
    b = [SyntheticFacts(random.Random(5)).sample().text for _ in range(1)]
    assert a == b
    assert make_fact(random.Random(3)) == make_fact(random.Random(3))


def test_curriculum_never_contains_eval_cues(eval_facts, train_text):
    rng = random.Random(0)
    for i in range(300):
        segments, block = [(1, 128), (2, 64), (3, 64), (5, 48)][i % 4]
        x, y = build_curriculum_episode(train_text, segments, block, rng)
        s = decode(np.concatenate([x.reshape(-1), y.reshape(-1)[-1:]]))
        for f in eval_facts:
            assert f.cue not in s


@pytest.mark.parametrize("segments,block", [(1, 256), (2, 64), (3, 64), (4, 128), (6, 64)])
def test_curriculum_episode_structure(train_text, segments, block):
    rng = random.Random(segments * 1000 + block)
    for _ in range(40):
        ep = curriculum_episode(train_text, segments, block, rng)
        assert ep.x.shape == ep.y.shape == ep.answer_mask.shape == (segments, block)
        assert ep.x.dtype == ep.y.dtype == np.int64
        fx, fy = ep.x.reshape(-1), ep.y.reshape(-1)
        assert np.array_equal(fx[1:], fy[:-1])  # y is x shifted by one, across segments
        stream = bytes(np.concatenate([fx, fy[-1:]]).astype(np.uint8))
        assert 1 <= len(ep.cued) <= len(ep.written) <= 8
        assert {f.cue for f in ep.cued} <= {f.cue for f in ep.written}
        for f in ep.cued:  # written, then recalled
            assert stream.count(f.text.encode()) >= 2, f.text
        if segments >= 2:  # the recall is in the last segment, the writes before it
            last = bytes(ep.x[-1].astype(np.uint8)) + bytes([int(ep.y[-1, -1])])
            for f in ep.cued:
                assert f.cue.encode() in last
        # the mask marks exactly the rests of the cued facts
        answer = bytes(fy[ep.answer_mask.reshape(-1)].astype(np.uint8)).decode()
        assert answer == "".join(f.rest for f in ep.cued)


def test_curriculum_masked_and_batch(train_text):
    x, y, m = build_curriculum_episode_masked(train_text, 3, 64, random.Random(1))
    assert m.dtype == bool and m.any()
    bx, by, bm = sample_curriculum(train_text, 4, 3, 64, random.Random(2))
    assert bx.shape == by.shape == bm.shape == (4, 3, 64)
    a = sample_curriculum(train_text, 2, 2, 64, random.Random(9))
    b = sample_curriculum(train_text, 2, 2, 64, random.Random(9))
    assert all((p == q).all() for p, q in zip(a, b))
