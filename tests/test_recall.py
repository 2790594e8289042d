"""Recall: the episodic memory's write/read on hand-made inputs, the recall metrics, and the
`imm recall` / `imm needle` commands end to end on a tiny trained run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from imm_cli.cli.app import app
from imm_cli.config import MemoryConfig
from imm_cli.experiments import probe
from imm_cli.experiments.needle import CONDITIONS, METRICS, _summarise, verdict
from imm_cli.memory import EpisodicMemory, Segment

runner = CliRunner()


def ids(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())], dtype=torch.long)


def segment(text: str, prev: str = "") -> Segment:
    x = ids(text)
    targets = torch.cat([x[:, 1:], torch.full((1, 1), -1)], dim=1)
    return Segment(ids=x, prev=ids(prev) if prev else x[:, :0], targets=targets)


def memory(slots: int = 2, local: bool = False, size: int = 64, decay: float = 1.0, span: int = 64) -> EpisodicMemory:
    torch.manual_seed(0)
    mem = EpisodicMemory(MemoryConfig(slots=slots, key_bytes=4, key_dim=64, local=local, size=size, decay=decay, span=span),
                         n_embd=16, block_size=16)
    mem.post_init()
    return mem


def write(mem: EpisodicMemory, state, text: str, surprise):
    seg = segment(text)
    s = surprise if isinstance(surprise, torch.Tensor) else torch.full(seg.ids.shape, float(surprise))
    return mem.write(torch.zeros(1, seg.ids.shape[1], 16), seg, state, s)


def recalled(mem: EpisodicMemory, state, cue: str) -> tuple[int, float]:
    """The byte the memory's learned-temperature read offers after the cue's last position, and the attention mass on it."""
    per_byte, _ = mem.lookup(segment(cue), state)
    last = per_byte[0, -1, 0]
    return int(last.argmax()), float(last.max().detach())


def test_written_entry_is_read_back_when_cued():
    mem = memory()
    state = write(mem, mem.init_state(1), "Zorvak was 1873.", surprise=2.0)
    byte, mass = recalled(mem, state, "xx Zorvak w")  # context "ak w" -> next byte "a"
    assert byte == ord("a") and mass > 0.5
    byte, mass = recalled(mem, state, "yy vak was 18")  # "s 18" -> "7"
    assert byte == ord("7") and mass > 0.5


def test_fresh_memory_reads_exactly_zero():
    mem = memory(local=False)
    seg = segment("Zorvak was 1873.")
    h = torch.randn(1, seg.ids.shape[1], 16)
    out = mem.read(h, seg, mem.init_state(1))
    assert torch.equal(out, torch.zeros_like(out))
    per_byte, _ = mem.lookup(seg, mem.init_state(1))
    assert float(per_byte.detach().sum()) == 0.0


def test_unrelated_cue_finds_nothing():
    mem = memory()
    state = write(mem, mem.init_state(1), "Zorvak was 1873.", surprise=2.0)
    _, mass = recalled(mem, state, "qqqqqqqq")
    assert mass < 0.2


def test_frozen_memory_keeps_its_state():
    mem = memory()
    state = write(mem, mem.init_state(1), "Zorvak was 1873.", surprise=2.0)
    mem.frozen = True
    after = write(mem, state, "Other text here.", surprise=9.0)
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_retention_keeps_the_most_surprising_entries_whatever_their_age():
    """Budget 16 entries: an old surprising text survives two later unsurprising ones, which
    compete among themselves; a later more surprising text displaces the weakest entries. (Each
    byte scored by its own loss: a span would mix each text's loss with the one written before it.)"""
    mem = memory(size=16, span=1)
    state = mem.init_state(1)
    state = write(mem, state, "Aaaa bbbb 1111.", surprise=5.0)  # 14 known next bytes, all kept
    state = write(mem, state, "Cccc dddd 2222.", surprise=1.0)  # 2 free entries: 2 of these
    state = write(mem, state, "Eeee ffff 3333.", surprise=2.0)  # beat the 2 weakest (1.0) only
    score = state["score"][0]
    assert torch.isfinite(score).all() and sorted(score.tolist()) == [2.0, 2.0] + [5.0] * 14
    assert recalled(mem, state, "xx Aaaa b")[0] == ord("b")  # oldest, kept: it was surprising
    assert recalled(mem, state, "xx Cccc d")[1] < 0.2  # forgotten: least surprising
    state = write(mem, state, "Gggg hhhh 4444.", surprise=9.0)  # the 14 most surprising of all
    assert sorted(state["score"][0].tolist()) == [5.0] * 2 + [9.0] * 14
    assert recalled(mem, state, "xx Gggg h")[0] == ord("h")


def test_trailing_span_keeps_a_runs_last_bytes():
    """A surprising run followed by easy text: its last bytes' centred span is half easy text, so
    they score below the run's middle; with `trail` they also score the span leading up to them,
    and rank with the run. A byte's score never falls (the higher of the two means)."""
    from imm_cli.config import MemoryConfig
    from imm_cli.memory.episodic import EpisodicMemory

    surprise = torch.full((1, 96), 0.5)  # easy text (p ~ 0.6: not exempted, loss above SURE)
    surprise[0, 16:48] = 3.0  # a 32-byte surprising run
    scores = {trail: EpisodicMemory(MemoryConfig(span=16, trail=trail), n_embd=16).retention_score(surprise)[0]
              for trail in (False, True)}
    assert (scores[True] >= scores[False]).all()
    last = 47
    assert scores[False][last] < scores[False][32] - 1.0  # centred: the tail sinks
    assert scores[True][last] == pytest.approx(3.0, abs=0.2)  # trailing: it keeps the run's score
    assert torch.equal(scores[True][:16], scores[False][:16])  # before the run nothing changes


def test_only_a_byte_the_model_was_sure_of_keeps_its_own_loss():
    """Inside a surprising run, a byte predicted with p = 0.99 keeps its own low loss (the model
    produces it without an entry), but one predicted with p = 0.9 ranks with its run: recalled
    through a read of other entries, such a byte is often missed (measured, module docstring)."""
    from imm_cli.memory.episodic import SURE
    mem = EpisodicMemory(MemoryConfig(span=16), n_embd=16)
    surprise = torch.full((1, 64), 3.0)
    surprise[0, 30], surprise[0, 34] = -math.log(0.99), -math.log(0.9)
    score = mem.retention_score(surprise)[0]
    assert score[30] == pytest.approx(-math.log(0.99)) and -math.log(0.99) < SURE < -math.log(0.9)
    assert score[34] > 2.5


def test_span_runs_across_segment_boundaries():
    """A text written in two segments scores the second segment's bytes exactly as the same text
    written whole: the state carries the loss of the bytes before (a span used to stop at the
    segment's edge and repeat the edge byte instead)."""
    torch.manual_seed(1)
    mem = EpisodicMemory(MemoryConfig(slots=2, span=16, key_bytes=4), n_embd=16, block_size=96)
    text = torch.randint(0, 256, (1, 97))
    surprise = torch.rand(1, 96) * 4
    surprise[0, 40:56] = 6.0  # a surprising run across the boundary at 48
    whole = mem.retention_score(surprise)

    def seg(lo: int, hi: int) -> Segment:
        return Segment(ids=text[:, lo:hi], prev=text[:, :lo], targets=text[:, lo + 1:hi + 1])

    state = mem.write(torch.zeros(1, 48, 16), seg(0, 48), mem.init_state(1), surprise[:, :48])
    second = mem.retention_score(surprise[:, 48:], state["before"])
    assert torch.allclose(second, whole[:, 48:])
    assert torch.isinf(mem.init_state(1)["before"]).all()  # an episode's first segment has nothing before it
    assert not torch.allclose(mem.retention_score(surprise[:, 48:]), whole[:, 48:])  # cut at the edge, it differs


def test_decay_below_one_lets_age_evict():
    mem = memory(size=16, decay=0.5, span=1)
    state = write(mem, mem.init_state(1), "Aaaa bbbb 1111.", surprise=5.0)
    state = write(mem, state, "Cccc dddd 2222.", surprise=3.0)  # 5 x 0.5 = 2.5 < 3: the old text goes
    assert recalled(mem, state, "xx Cccc d")[0] == ord("d")
    assert (state["score"][0] == 3.0).sum() == 14


def test_retained_entries_stay_where_they_are():
    """A write only replaces the entries it evicts: the others keep their index (slots stay meaningful)."""
    mem = memory(size=32)
    state = write(mem, mem.init_state(1), "Aaaa bbbb 1111.", surprise=5.0)
    before = state["bytes"].clone()
    state = write(mem, state, "Cccc dddd 2222.", surprise=1.0)
    kept = torch.isfinite(state["score"]) & (state["score"] == 5.0)
    assert torch.equal(state["bytes"][kept], before[kept]) and int(kept.sum()) == 14
    assert state["born"][0][state["score"][0] == 1.0].eq(1).all()


def test_entries_fill_the_buffer_from_its_start_and_reads_stop_at_the_last():
    """Writes take the empty entries lowest index first, so a partly filled memory is a prefix of
    its buffer; a read of it equals the read of the same entries in a buffer cut to that prefix."""
    mem = memory(size=256, local=False)
    state = mem.init_state(1)
    for i, text in enumerate(("Aaaa bbbb 1111.", "Cccc dddd 2222.", "Eeee ffff 3333.")):
        state = write(mem, state, text, surprise=1.0 + i)
        valid = torch.isfinite(state["score"][0])
        n = int(valid.sum())
        assert n == 14 * (i + 1) and valid[:n].all() and not valid[n:].any()
    cut = mem.read_only(state)  # what the experiments repeat for many prompts
    assert cut["keys"].shape[1] == n and torch.equal(cut["bytes"], state["bytes"][:, :n])
    a, _ = mem.lookup(segment("xx Cccc dd"), state)
    b, _ = mem.lookup(segment("xx Cccc dd"), cut)
    assert torch.allclose(a, b)


def test_entries_keep_the_most_surprising_positions():
    mem = EpisodicMemory(MemoryConfig(slots=1, key_bytes=4, entries=3, local=False, size=8), n_embd=16, block_size=16)
    seg = segment("abcdefgh")
    surprise = torch.tensor([[0.0, 5.0, 0.0, 4.0, 0.0, 0.0, 3.0, 9.0]])  # last has no known next byte
    state = mem.write(torch.zeros(1, 8, 16), seg, mem.init_state(1), surprise)
    valid = torch.isfinite(state["score"][0])
    assert sorted(state["bytes"][0][valid].tolist()) == sorted([ord("c"), ord("e"), ord("h")])
    assert int(valid.sum()) == 3


def test_topk_read_stays_sharp_among_many_entries():
    """One true match among thousands of near-misses: the top-k read still carries its byte;
    the dense read (topk 0) spreads its mass over the crowd."""
    torch.manual_seed(0)
    cfgs = {k: MemoryConfig(slots=1, key_bytes=4, key_dim=64, local=False, size=4096, topk=k) for k in (4, 0)}
    mems = {k: EpisodicMemory(c, n_embd=16, block_size=4096) for k, c in cfgs.items()}
    mems[0].load_state_dict(mems[4].state_dict())
    crowd = "".join(f"k{i % 10}{(i // 10) % 10}m" for i in range(1000))  # many contexts sharing bytes with the cue
    out = {}
    for k, mem in mems.items():
        state = write(mem, mem.init_state(1), crowd[:3000] + "Zork", surprise=1.0)
        state = write(mem, state, "xxZorvak.", surprise=1.0)
        out[k] = recalled(mem, state, "yyZorv")
    assert out[4][0] == ord("a") and out[4][1] > 0.5
    assert out[0][1] < out[4][1]


def test_sharp_read_prefers_the_exact_context_to_near_misses():
    """Three stored contexts share 3 of the cue's 4 key bytes and carry "R"; one matches exactly and
    carries "Q". The learned-temperature read (1/20 at initialisation) gives the near-misses a
    real share; the sharp read (1/48) puts nearly all its mass on the exact match."""
    torch.manual_seed(0)
    mem = EpisodicMemory(MemoryConfig(slots=1, key_bytes=4, key_dim=64, local=False, size=64, sharp=48.0),
                         n_embd=16, block_size=32)
    state = write(mem, mem.init_state(1), "1abcR.2abcR.3abcR.zabcQ.", surprise=2.0)
    per_byte, _ = mem.lookup(segment("..zabc"), state)
    soft, sharp = per_byte[0, -1, 0].detach(), per_byte[0, -1, 1].detach()
    share = {name: float(p[ord("Q")] / p.sum()) for name, p in (("soft", soft), ("sharp", sharp))}
    assert share["sharp"] > 0.9 and share["soft"] < share["sharp"] - 0.1, share


def test_sharp_channel_off_is_the_single_learned_read():
    """sharp 0: no second projection or "nothing" level, and the read is the learned channel alone."""
    cfg = MemoryConfig(slots=1, key_bytes=4, key_dim=64, size=64, sharp=0.0)
    mem = EpisodicMemory(cfg, n_embd=16, block_size=32)
    assert not hasattr(mem, "sharp_out") and not hasattr(mem, "sharp_null")
    state = write(mem, mem.init_state(1), "zabcQ.", surprise=2.0)
    per_byte, _ = mem.lookup(segment("..zabc"), state)
    assert per_byte.shape[2] == 1


def test_metrics_on_hand_made_cases():
    assert probe.exact_matches([b" abc.", b" abx.", b" abc.."], [b" abc.", b" abc.", b" abc."]) == [True, False, True]
    per_trial = [{c: {"exact": [1, 0], "char_accuracy": [1.0, 0.5], "loss_per_byte": [0.1, 0.3], "recall_at_1": [1, 1]}
                  for c in CONDITIONS},
                 {c: {"exact": [0, 0], "char_accuracy": [0.5, 0.5], "loss_per_byte": [0.2, 0.2], "recall_at_1": [1, 0]}
                  for c in CONDITIONS}]
    s = _summarise(per_trial)
    assert s["memory"]["exact_match"] == pytest.approx(0.25) and s["memory"]["exact_match_std"] == pytest.approx(0.25)
    assert s["fresh"]["char_accuracy"] == pytest.approx(0.625)
    assert s["memory"]["recall_at_1"] == pytest.approx(0.75)
    good = {c: {m: 0.0 for m in METRICS} for c in CONDITIONS}
    good["memory"].update(exact_match=0.8, char_accuracy=0.9)
    assert verdict(good).startswith("the memory recalls")
    bad = {c: {m: 0.0 for m in METRICS} for c in CONDITIONS}
    assert verdict(bad).startswith("no recall")


def test_haystack_holds_the_fact_once_at_its_depth():
    import random

    import numpy as np

    from imm_cli.facts import Fact

    text = np.frombuffer(("line of plain text\n" * 400).encode(), dtype=np.uint8)
    f = Fact.from_text("Zorvak Tennel was born in 1873.")
    for depth in (0.0, 0.5, 1.0):
        h = probe.haystack(text, f, 300, depth, random.Random(0))
        assert len(h) == 300 and h.count(f.text.encode()) == 1
        at = h.find(f.text.encode()) / 300
        assert abs(at - depth) < 0.2
    p = probe.cue_prompt(text, f, 40, random.Random(0))
    assert len(p) == 40 and p.endswith(b"\nZorvak Tennel") and f.rest.encode() not in p


# --- the commands, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("recall")
    common = ["--layers", "1", "--heads", "2", "--embd", "32", "--block-size", "128", "--batch-size", "4",
              "--iters", "2", "--eval-every", "2"]
    runs = {}
    for name, extra in (("episodic", ["--slots", "4", "--segments", "2"]),
                        ("linformer", ["--slots", "4", "--memory", "linformer", "--segments", "2"]),
                        ("s0", ["--slots", "0"])):
        out = base / name
        r = runner.invoke(app, ["train", *common, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        runs[name] = out
    return runs


@pytest.mark.parametrize("kind, placement", [("episodic", "line"), ("linformer", "line"), ("episodic", "prose")])
def test_recall_command(tiny_runs, kind, placement, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["recall", "--run", str(tiny_runs[kind]), "--facts", "examples/facts.txt", "--out", str(out),
                            "--placement", placement, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["facts"]) == 16
    for f in doc["facts"]:
        assert {"cue", "expected", "generated", "exact", "char_accuracy", "loss_per_byte", "loss_per_byte_fresh"} <= set(f)
        assert 0 <= f["char_accuracy"] <= 1 and math.isfinite(f["loss_per_byte"])
    assert set(doc["summary"]) == {"memory", "fresh", "other_facts"}
    assert doc["settings"]["placement"] == placement
    assert doc["context_influence"]["mean_kl_rest"] >= 0
    m = doc["misses"]  # one cause per miss of the memory condition
    assert m["rows"] == 16 and m["misses"] == sum(not f["exact"] for f in doc["facts"]) == sum(m["causes"].values())
    if kind == "linformer":  # no exact entries: never "not in text" or "not kept"
        assert m["causes"]["not_in_text"] == m["causes"]["not_kept"] == 0
    assert doc["model"]["knn_lm"] == (MemoryConfig.knn_lm if kind == "episodic" else None)  # the run's own (the default)
    words = " ".join(r.stderr.split())  # a rich title may wrap anywhere
    assert (f"kNN-LM mix {MemoryConfig.knn_lm:g}" in words) == (kind == "episodic")
    assert "why the memory missed" in r.stderr
    assert (out / "context_influence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "recall.json").is_file()


def test_needle_command(tiny_runs, tmp_path):
    out = tmp_path / "n"
    r = runner.invoke(app, ["needle", "--run", str(tiny_runs["episodic"]), "--facts", "examples/facts.txt", "--trials", "2",
                            "--length", "256", "--lengths", "256,384", "--depths", "0,1", "--document", "1,4,64",
                            "--distance", "256,1024", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["conditions"]) == set(CONDITIONS)
    for c in doc["conditions"].values():
        for m in METRICS:
            assert m in c and m + "_std" in c
        assert 0 <= c["exact_match"] <= 1 and 0 <= c["recall_at_1"] <= 1
    assert len(doc["facts"]) == 16 and set(doc["facts"][0]["conditions"]) == set(CONDITIONS)
    assert doc["conditions"]["memory"]["facts"] == 16 and 0 < doc["conditions"]["in_context"]["facts"] <= 16
    assert {"cue", "expected"} <= set(doc["facts"][0])
    assert {"generated", "exact"} <= set(doc["facts"][0]["conditions"]["memory"])
    assert doc["heatmap"]["lengths"] == [256, 384] and len(doc["heatmap"]["exact_match"]) == 2
    assert set(doc["placements"]) == {"line", "prose"} and doc["placements"]["line"] == doc["conditions"]
    assert doc["capacity"]["n_facts"] == [1, 4, 16]  # 64 capped at the 16 facts given, with a note
    assert any("at most 16 facts" in n for n in doc["notes"])
    for curve, conds in ((doc["capacity"], ("memory", "fresh", "text_only")), (doc["distance"], ("memory", "fresh", "other_facts"))):
        for c in conds:
            assert len(curve[c]["exact_match"]) == len(curve["n_facts" if "n_facts" in curve else "lengths"])
    assert doc["distance"]["lengths"] == [256, 1024]
    # every memory-condition miss has one cause: per placement over both trials, per curve point
    for place, m in doc["misses"].items():
        assert m["rows"] == 16 * 2 and sum(m["causes"].values()) == m["misses"]
        assert m["misses"] == round((1 - doc["placements"][place]["memory"]["exact_match"]) * 32)
    for curve, xs in ((doc["capacity"], "n_facts"), (doc["distance"], "lengths")):
        assert [m["rows"] for m in curve["misses"]] == ([1, 4, 16] if xs == "n_facts" else [16, 16])
        for m, em in zip(curve["misses"], curve["memory"]["exact_match"]):
            assert m["misses"] == round((1 - em) * m["rows"])
    assert "why the memory missed" in r.stderr
    for name in ("needle.json", "needle_heatmap.png", "capacity.png", "distance.png"):
        assert (out / name).is_file()
    assert doc["model"]["knn_lm"] == MemoryConfig.knn_lm


def test_knn_lm_override_is_recorded(tiny_runs, tmp_path):
    """`--knn-lm 0` measures the same run without the kNN-LM mix; the JSON says which was measured."""
    r = runner.invoke(app, ["recall", "--run", str(tiny_runs["episodic"]), "--facts", "examples/facts.txt",
                            "--out", str(tmp_path / "o"), "--knn-lm", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["knn_lm"] == 0.0
    assert "no kNN-LM mix" in " ".join(r.stderr.split())  # the table's title says what was measured
    assert json.loads((tiny_runs["episodic"] / "config.json").read_text())["model"]["memory"]["knn_lm"] == MemoryConfig.knn_lm  # the run is untouched


def test_knn_exact_override_is_recorded(tiny_runs, tmp_path):
    r = runner.invoke(app, ["recall", "--run", str(tiny_runs["episodic"]), "--facts", "examples/facts.txt",
                            "--out", str(tmp_path / "o"), "--knn-lm", "0.3", "--knn-exact", "0.7", "--json"])
    assert r.exit_code == 0, r.output
    model = json.loads(r.stdout)["model"]
    assert (model["knn_lm"], model["knn_exact"]) == (0.3, 0.7)
    assert "kNN-LM mix 0.3 (0.7 exact)" in " ".join(r.stderr.split())


def test_far_weight_override_is_recorded(tiny_runs, tmp_path):
    """--far-weight measures the same weights with another far-key weight: recorded in the JSON,
    and the report names it as an override of the run's own."""
    from imm_cli.report import overrides_of

    r = runner.invoke(app, ["recall", "--run", str(tiny_runs["episodic"]), "--facts", "examples/facts.txt",
                            "--out", str(tmp_path / "o"), "--far-weight", "0.2", "--json"])
    assert r.exit_code == 0, r.output
    model = json.loads(r.stdout)["model"]
    assert model["far_weight"] == 0.2
    assert "far key 0.2" in " ".join(r.stderr.split())  # and in the table's title
    own = json.loads((tiny_runs["episodic"] / "config.json").read_text())["model"]["memory"]
    assert own["far_weight"] != 0.2 and overrides_of(model, own) == [f"--far-weight 0.2 (the run's: {own['far_weight']:g})"]


def test_memory_size_override_is_recorded_and_acts(tiny_runs, tmp_path):
    """--memory-size measures the same weights under another budget: recorded in the JSON, shown in
    the title, the run untouched."""
    base = ["needle", "--run", str(tiny_runs["episodic"]), "--facts", "examples/facts.txt", "--trials", "1", "--no-sweeps", "--json"]
    runs_ = {size: runner.invoke(app, [*base, "--out", str(tmp_path / str(size)), *(["--memory-size", str(size)] if size else [])])
             for size in (None, 64)}
    for r in runs_.values():
        assert r.exit_code == 0, r.output
    docs = {size: json.loads(r.stdout) for size, r in runs_.items()}
    assert docs[None]["model"]["memory_size"] == MemoryConfig.size and docs[64]["model"]["memory_size"] == 64
    assert "64 entries" in " ".join(runs_[64].stderr.split())
    assert json.loads((tiny_runs["episodic"] / "config.json").read_text())["model"]["memory"]["size"] == MemoryConfig.size


def test_memory_size_override_needs_a_budgeted_memory(tiny_runs, tmp_path):
    r = runner.invoke(app, ["recall", "--run", str(tiny_runs["linformer"]), "--facts", "examples/facts.txt",
                            "--out", str(tmp_path / "o"), "--memory-size", "4096"])
    assert r.exit_code == 2
    assert "--memory-size: only the episodic and knn memories" in " ".join(r.output.split())


def test_facts_longer_than_the_window_are_measured(tiny_runs, tmp_path):
    """A fact longer than the window is written, cued and generated past the window; only the
    fact-in-window control, which cannot hold it, is null with a note."""
    facts = tmp_path / "long.txt"
    facts.write_text("Zorvak Tennel " + "was born in a village by the sea, " * 4 + "in 1873.\nQuibbel Harrow sailed far.\n")
    r = runner.invoke(app, ["needle", "--run", str(tiny_runs["episodic"]), "--facts", str(facts), "--trials", "1",
                            "--no-sweeps", "--placement", "prose", "--out", str(tmp_path / "n"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["facts"][0]["conditions"]["in_context"] is None
    assert any("fact(s) 1 do not fit" in n for n in doc["notes"])
    # the short fact beside it keeps its control: the long rest is not what its window must hold
    assert doc["facts"][1]["conditions"]["in_context"] is not None
    # generated past the 128-byte window: as many bytes as the 145-byte rest (decoded with replacement: a
    # tiny model's invalid UTF-8 becomes one U+FFFD per byte, so characters <= bytes)
    gen = doc["facts"][0]["conditions"]["memory"]["generated"]
    assert 128 < len(gen) <= 145


def test_commands_refuse_a_model_without_memory(tiny_runs, tmp_path):
    for cmd in ("recall", "needle"):
        out = tmp_path / cmd
        r = runner.invoke(app, [cmd, "--run", str(tiny_runs["s0"]), "--facts", "examples/facts.txt", "--out", str(out)])
        assert r.exit_code == 2
        assert "no memory" in r.output
        assert not out.exists()


def test_facts_too_long_for_the_model_are_refused(tiny_runs, tmp_path):
    facts = tmp_path / "long.txt"
    facts.write_text("Zorvak Tennel " + "x" * 200 + ".\nAnother fact is here.\n")
    r = runner.invoke(app, ["needle", "--run", str(tiny_runs["episodic"]), "--facts", str(facts)])
    assert r.exit_code == 2 and "bytes" in r.output


def test_prose_prompt_has_its_length_when_no_line_is_long_enough():
    """Text of short lines has no 16-byte stretch inside a line: the prose prompt falls back to filler
    of exactly the asked length (the prompts of a batch must be equally long)."""
    import random

    import numpy as np

    from imm_cli.facts import Fact

    text = np.frombuffer(b"short\n" * 500, dtype=np.uint8)
    for length in (20, 64, 90):
        p = probe.cue_prompt(text, Fact.from_text("Zorvak Tennel was born."), length, random.Random(1), placement="prose")
        assert len(p) == length and p.endswith(b" Zorvak Tennel") and b"\n" not in p[-30:]


def test_in_window_control_holds_every_fact_that_fits_alone():
    """Two long facts that each fit the window beside their cue, but not in one batch (a shared
    prompt length is set by the longest rest): both are measured, in batches of their own."""
    from imm_cli.config import ModelConfig
    from imm_cli.experiments.needle import _fits_in_window, _in_window_groups
    from imm_cli.facts import Fact
    from imm_cli.model import GPT

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128))
    facts = [Fact.from_text("Magellan's fleet completed the first circumnavigation in 1522."),
             Fact.from_text("Photosynthesis converts light energy into chemical energy here."),
             Fact.from_text("Zorvak Tennel " + "was born by the sea, " * 6 + "in 1873."),  # fits nowhere
             Fact.from_text("Quibbel Harrow sailed far.")]
    rests = probe.encode_rests(facts)
    assert all(_fits_in_window(model, facts[i], len(rests[i])) for i in (0, 1, 3))
    assert not _fits_in_window(model, facts[0], max(len(rests[0]), len(rests[1]))) or \
        not _fits_in_window(model, facts[1], max(len(rests[0]), len(rests[1])))
    groups = _in_window_groups(model, facts, rests)
    assert sorted(i for rows, _ in groups for i in rows) == [0, 1, 3]
    for rows, r_max in groups:  # each batch's shared generation length fits every row of it
        assert r_max == max(len(rests[i]) for i in rows)
        assert all(_fits_in_window(model, facts[i], r_max) for i in rows)


def test_recall_at_1_follows_each_rows_true_rest():
    """recall@1 of a subset of prompts, in another order, ranks them among every rest as the full set does."""
    from imm_cli.config import ModelConfig
    from imm_cli.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    rests = [b" alpha beta", b" gamma", b" delta epsilon zeta", b" eta"]
    prompts = torch.randint(0, 256, (4, 20))
    full = probe.recall_at_1(model, None, prompts, rests)
    sub = probe.recall_at_1(model, None, prompts[[2, 0]], rests, truth=[2, 0])
    assert sub.tolist() == full[[2, 0]].tolist()
    chunked = probe.recall_at_1(model, None, prompts[[3, 1, 2]], rests, rows=4, truth=[3, 1, 2])  # one prompt per chunk
    assert chunked.tolist() == full[[3, 1, 2]].tolist()


def test_haystacks_shorter_than_the_longest_fact_are_refused(tiny_runs, tmp_path):
    """Found by a new-user pass: --length 40 with a 62-byte fact ended in an AssertionError (exit 1)
    after work had begun; now every haystack length (and --spacing) is checked first, exit 2."""
    facts = tmp_path / "f.txt"
    facts.write_text("Magellan's fleet completed the first circumnavigation in 1522.\nQuibbel Harrow sailed far.\n")
    for flag, value in (("--length", "40"), ("--lengths", "1024,10"), ("--distance", "63"), ("--spacing", "63")):
        out = tmp_path / flag.strip("-")
        r = runner.invoke(app, ["needle", "--run", str(tiny_runs["episodic"]), "--facts", str(facts), flag, value,
                                "--trials", "1", "--out", str(out)])
        assert r.exit_code == 2, (flag, r.output)
        assert f"{flag} " in r.output and "at least 64 bytes" in r.output and "Traceback" not in r.output
        assert not out.exists()
    r = runner.invoke(app, ["needle", "--run", str(tiny_runs["episodic"]), "--facts", str(facts), "--length", "64",
                            "--trials", "1", "--no-sweeps", "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output


def test_needle_table_says_how_many_facts_the_in_window_control_scored():
    """Facts too long for the window beside their cue are left out of that control only: its row says so."""
    from rich.console import Console

    from imm_cli.cli.needle import _conditions_table

    row = {m + s: 0.5 for m in METRICS for s in ("", "_std")}
    conds = {c: {**row, "facts": 24} for c in CONDITIONS} | {"in_context": {**row, "facts": 3}}
    console = Console(width=200, record=True)
    console.print(_conditions_table("t", conds))
    text = console.export_text()
    assert "fact in window (upper bound), 3 of 24 facts" in text
    assert "memory (fact written once)" in text and "of 24 facts" not in text.replace("3 of 24 facts", "")
