"""`imm compare` end to end through the real CLI (in-process main()) on tiny trained runs: the figures it
reports are those of the runs' JSON files, missing experiments are run (or shown as not run), a run
without memory shows no memory figures, and bad input is one line with exit code 2."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, snapshot, tiny_configs
from imm_cli.experiments.compare import ratio_interval

PNG = b"\x89PNG\r\n\x1a\n"
CONDS = ("memory", "fresh", "other_facts", "in_context")


def _cond(em: float, r1: float) -> dict:
    return {"exact_match": em, "exact_match_std": 0.0, "char_accuracy": 0.5, "char_accuracy_std": 0.0,
            "loss_per_byte": 1.5, "loss_per_byte_std": 0.0, "recall_at_1": r1, "recall_at_1_std": 0.0}


# a needle.json as `imm needle` writes it, with the measurements being added (placements, distance,
# document) in two shapes a curve may take: conditions as lists, or under "conditions" as dicts
NEEDLE = {
    "run": "x", "facts_file": "examples/facts.txt",
    "settings": {"length": 512, "depth": 0.5, "trials": 3, "facts": 16},
    "model": {"memory": "episodic", "slots": 8, "block_size": 32},
    "conditions": {"memory": _cond(0.75, 1.0), "fresh": _cond(0.0, 0.0625), "other_facts": _cond(0.0625, 0.0),
                   "in_context": _cond(1.0, 1.0)},
    "facts": [], "per_trial": [], "verdict": "the memory recalls",
    "capacity": {"n_facts": [1, 2, 4], "exact_match": [0.75, 0.5, 0.25], "char_accuracy": [0.9, 0.8, 0.6], "memories": [16, 8, 4]},
    "placements": {"line": {"memory": _cond(0.75, 1.0), "fresh": _cond(0.0, 0.0)},
                   "prose": {"conditions": {"memory": _cond(0.5, 0.875), "fresh": _cond(0.0, 0.125)}}},
    "distance": {"distance": [512, 4096, 16384], "memory": [0.9, 0.5, 0.125], "fresh": [0.0, 0.0, 0.0]},
    "document": {"n_facts": [4, 16, 64], "memory_size": 4096,
                 "conditions": {"memory": {"exact_match": [1.0, 0.75, 0.5]}, "other_facts": {"exact_match": [0.0, 0.0625, 0.0]}}},
    "gap": [{"gap": 0, "memory": {"exact_match": 0.75}, "fresh": {"exact_match": 0.0}},
            {"gap": 1024, "memory": {"exact_match": 0.25}, "fresh": {"exact_match": 0.0}}],
    "not_a_curve": {"note": "skipped"},
}


@pytest.fixture(scope="module")
def s0_run(tmp_path_factory) -> Path:
    """A tiny run without memory (--slots 0), trained 2 steps."""
    from imm_cli.train import train

    out = tmp_path_factory.mktemp("compare") / "s0"
    train(*tiny_configs(slots=0), out)
    return out


@pytest.fixture
def ep_run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny episodic run with a needle.json written after its weights."""
    dst = tmp_path / "ep"
    shutil.copytree(tiny_run, dst)
    (dst / "needle.json").write_text(json.dumps(NEEDLE))
    return dst


def _doc(imm, *args) -> dict:
    r = imm("compare", *args, "--json")
    assert r.code == 0, r.stderr
    return json.loads(r.stdout)


def _read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def test_figures_are_those_of_the_runs_files(imm, ep_run, s0_run, tmp_path):
    out = tmp_path / "cmp"
    untouched = snapshot(s0_run)
    doc = _doc(imm, str(ep_run), str(s0_run), "--no-speed", "--out", str(out))
    ep, s0 = doc["runs"]
    assert [ep["name"], s0["name"]] == ["ep", "s0"]
    # training figures: config.json's summary
    for run, fig in ((ep_run, ep), (s0_run, s0)):
        summary = _read(run, "config.json")["summary"]
        for k in ("params", "memory_params", "memory_share", "val_loss", "val_loss_ablated", "step"):
            assert fig["train"][k] == summary[k], k
    # store and usage were missing: run with defaults, their JSON written into the run folder as the commands do
    assert ep["status"]["store"] == ep["status"]["usage"] == "ran" and ep["status"]["needle"] == "read"
    store, usage = _read(ep_run, "store.json"), _read(ep_run, "usage.json")
    assert store["sequences"] == 50 and ep["store"]["mean"] == store["mean"] and ep["store"]["std"] == store["std"]
    for c in ("initial", "random", "other_sequence"):
        assert ep["store"]["controls"][c]["mean"] == store["controls"][c]["mean"]
    assert ep["usage"]["entropy"] == usage["entropy"] and ep["usage"]["min_max_ratio"] == usage["min_max_ratio"]
    assert ep["usage"]["dead_slots"] == len(usage["dead_slots"])
    # needle: every condition, placement and curve present in needle.json
    for c in CONDS:
        for m in ("exact_match", "recall_at_1"):
            assert ep["needle"]["conditions"][c][m] == NEEDLE["conditions"][c][m]
    assert ep["needle"]["placements"]["line"]["memory"]["exact_match"] == 0.75
    assert ep["needle"]["placements"]["prose"]["fresh"]["recall_at_1"] == 0.125
    curves = ep["needle"]["curves"]
    assert curves["capacity"]["x"] == [1, 2, 4] and curves["capacity"]["exact_match"] == {"memory": [0.75, 0.5, 0.25]}
    assert curves["distance"]["x_name"] == "distance" and curves["distance"]["exact_match"]["fresh"] == [0.0, 0.0, 0.0]
    assert curves["document"]["x"] == [4, 16, 64] and curves["document"]["exact_match"]["other_facts"] == [0.0, 0.0625, 0.0]
    assert curves["gap"]["x"] == [0, 1024] and curves["gap"]["exact_match"]["memory"] == [0.75, 0.25]
    assert set(curves) == {"capacity", "distance", "document", "gap"}
    assert ep["speed"] is None and ep["status"]["speed"] == "not run" and ep["notes"] == [] and doc["notes"] == []
    # no memory: every memory figure absent, and the run folder untouched
    assert all(s0[k] is None for k in ("store", "usage", "needle", "recall"))
    assert {s0["status"][k] for k in ("store", "usage", "needle", "recall")} == {"no memory"}
    assert snapshot(s0_run) == untouched
    # compare's own files
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["compare.json", "compare.png"]
    assert (out / "compare.png").read_bytes()[:8] == PNG
    saved = json.loads((out / "compare.json").read_text())
    assert saved["runs"] == doc["runs"] and doc["files"]["json"] == str(out / "compare.json")


def test_no_run_reads_what_is_there_and_says_what_is_not(imm, tiny_run, s0_run, ep_run, tmp_path):
    """One compare --no-run of four runs: nothing written into any; missing, stale and other-facts
    results said as such; a run saved before its first summary counted from its config."""
    step0, stale = tmp_path / "step0", tmp_path / "stale"
    shutil.copytree(tiny_run, step0)
    shutil.copytree(ep_run, stale)
    (step0 / "config.json").write_text(json.dumps({**_read(tiny_run, "config.json"), "summary": {"step": 0}}))
    old = time.time() - 3600
    os.utime(stale / "needle.json", (old, old))  # older than the weights: from an earlier training
    runs_ = [tiny_run, s0_run, ep_run, stale, step0]
    before = snapshot(*runs_)
    r = imm("compare", *map(str, runs_), "--facts", "examples/heldout_facts.txt", "--no-run", "--no-speed",
            "--out", str(tmp_path / "o"), "--json")
    assert r.code == 0, r.stderr
    assert snapshot(*runs_) == before
    fresh, s0, ep, old_needle, no_summary = json.loads(r.stdout)["runs"]
    assert fresh["store"] is None and fresh["usage"] is None and fresh["needle"] is None
    assert fresh["status"]["needle"] == "not run" and s0["status"]["needle"] == "no memory"
    assert "not run" in r.stderr and "—" in r.stderr
    assert ep["needle"]["conditions"]["memory"]["exact_match"] == 0.75  # read, with a note: not the --facts file
    assert any("measured on examples/facts.txt, not on --facts examples/heldout_facts.txt" in n for n in ep["notes"])
    assert old_needle["needle"] is None and any("older than the run's weights" in n for n in old_needle["notes"])
    summary = _read(tiny_run, "config.json")["summary"]
    train = no_summary["train"]
    assert (train["params"], train["memory_params"]) == (summary["params"], summary["memory_params"])
    assert train["step"] == 0 and train["val_loss"] is None


def test_needle_is_run_where_missing(imm, tmp_path, monkeypatch):
    """A run lacking needle.json gets one, written as `imm needle` would (its defaults, shortened here
    to one trial without sweeps to keep the test fast), and compare reports its figures."""
    from imm_cli.experiments import needle
    from imm_cli.train import train

    monkeypatch.setattr(needle, "NeedleSettings", functools.partial(needle.NeedleSettings, trials=1, sweeps=False))
    model_cfg, cfg = tiny_configs(slots=4, segments=2, batch_size=4)
    run = tmp_path / "b128"
    train(dataclasses.replace(model_cfg, block_size=128), cfg, run)
    facts = tmp_path / "facts.txt"
    lines = [ln for ln in (REPO / "examples" / "facts.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    facts.write_text("\n".join(lines[:2]) + "\n")
    doc = _doc(imm, str(run), "--facts", str(facts), "--no-speed", "--out", str(tmp_path / "o"))
    fig = doc["runs"][0]
    written = _read(run, "needle.json")
    assert fig["status"]["needle"] == "ran" and written["facts_file"] == str(facts)
    for c in CONDS:
        assert fig["needle"]["conditions"][c]["exact_match"] == written["conditions"][c]["exact_match"]


def test_a_needle_that_cannot_run_is_a_note(imm, tiny_run, tmp_path):
    run = tmp_path / "ep"
    shutil.copytree(tiny_run, run)
    facts = tmp_path / "one.txt"
    facts.write_text("Zor Ven is 12.\n")  # needle compares facts: one is refused by the experiment, for this run
    r = imm("compare", str(run), "--facts", str(facts), "--no-speed", "--out", str(tmp_path / "o"), "--json")
    assert r.code == 0, r.stderr
    fig = json.loads(r.stdout)["runs"][0]
    assert fig["needle"] is None and fig["status"]["needle"] == "failed" and fig["status"]["store"] == "ran"
    assert any(n.startswith("needle could not run") for n in fig["notes"]) and not (run / "needle.json").exists()


def test_training_speed_against_slots0(imm, ep_run, s0_run, tmp_path):
    doc = _doc(imm, str(ep_run), str(s0_run), "--no-run", "--speed-seconds", "0.2", "--out", str(tmp_path / "o"))
    ep, s0 = (r["speed"] for r in doc["runs"])
    assert ep["measured"] and ep["ratio"] > 0 and ep["rounds"] >= 3
    assert abs(ep["ratio"] - ep["ms_per_step_slots0"] / ep["ms_per_step"]) < 1e-9
    lo, hi = ep["ratio_interval"]
    assert 0 < lo <= hi
    assert s0 == {"ratio": 1.0, "measured": False, "note": "the baseline itself (--slots 0)"}


@pytest.mark.parametrize("case", ["missing", "not_a_run", "none", "twice", "facts", "out_is_run", "device", "speed_seconds",
                                  "read_only", "foreign_out"])
def test_bad_input_is_one_line_and_exit_2(imm, tiny_run, tmp_path, monkeypatch, case):
    if case == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    monkeypatch.chdir(tmp_path)  # examples/facts.txt does not exist here
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    (tmp_path / "empty").mkdir()
    if case == "foreign_out":  # a compare.json that imm did not write is not replaced without --force
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "compare.json").write_text("mine")
    args = {"missing": [str(tmp_path / "nope")], "not_a_run": [str(tmp_path / "empty")], "none": [], "read_only": [str(bare)], "foreign_out": [str(bare), "--no-run"],
            "twice": [str(bare), str(bare) + "/."], "facts": [str(bare)],
            "out_is_run": [str(bare), "--no-run", "--out", str(bare)], "device": [str(bare), "--no-run", "--device", "tpu"],
            "speed_seconds": [str(bare), "--no-run", "--speed-seconds", "-1"]}[case]
    before = snapshot(tmp_path)
    if case == "read_only":
        bare.chmod(0o555)  # compare would write store.json, usage.json and needle.json there
    r = imm("compare", *args, "--no-speed", *([] if case == "out_is_run" else ["--out", str(tmp_path / "o")]))
    bare.chmod(0o755)
    assert r.code == 2, r.stderr
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("error:"), r.stderr
    assert snapshot(tmp_path) == before


# --- the throughput interval ------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=30), st.floats(0.2, 5.0))
def test_interval_keeps_rounds_paired(slowdown, c):
    """A round's noise slows both contenders alike: when every round's ratio is exactly c, however
    much the rounds differ from each other, the interval is c itself (resampling the two lists
    independently would spread it)."""
    base = [10.0 * s for s in slowdown]
    lo, hi = ratio_interval(base, [b / c for b in base])
    assert lo == pytest.approx(c, rel=1e-9) and hi == pytest.approx(c, rel=1e-9)


def test_interval_narrows_with_rounds_and_holds_the_ratio():
    import numpy as np

    rng = np.random.default_rng(1)
    widths = []
    for n in (12, 192):
        base = rng.lognormal(0.0, 0.05, n) * 30
        other = rng.lognormal(0.0, 0.05, n) * 35
        lo, hi = ratio_interval(list(base), list(other))
        point = np.median(base) / np.median(other)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


@pytest.mark.parametrize("base, other", [([], []), ([1.0, 2.0], [1.0]), ([[1.0]], [[1.0]])])
def test_interval_refuses_unpaired_rounds(base, other):
    with pytest.raises(ValueError, match="paired rounds"):
        ratio_interval(base, other)
