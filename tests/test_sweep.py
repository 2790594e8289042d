"""imm sweep: a 2 x 2 grid end to end, resuming (nothing retrained), facts that do not fit, sweep.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO

from imm_cli.experiments import sweep as S

FACTS = str(REPO / "examples" / "facts.txt")
# tiny model; block 128 so that examples/facts.txt fits the needle test
SMALL = ["--layers", "1", "--heads", "2", "--embd", "32", "--batch-size", "8", "--sequences", "5", "--device", "cpu",
         "--iters", "3", "--facts", FACTS]


def _lines(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "sweep.jsonl").read_text().splitlines()]


def _mtimes(out: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "points").glob("*/model.safetensors")}


def test_sweep_grid_then_again_trains_nothing(imm, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "sw"
    args = ["sweep", "--memory", "linformer", "--slots", "4,8", "--memory-lr", "0.04,0.2", "--block-size", "128", *SMALL,
            "--out", str(out)]
    r = imm(*args, "--json")
    assert r.code == 0, r.stderr
    lines = _lines(out)
    assert len(lines) == 4 and len({ln["name"] for ln in lines}) == 4
    assert {(ln["point"]["slots"], ln["point"]["memory_lr"]) for ln in lines} == {(4, 0.04), (4, 0.2), (8, 0.04), (8, 0.2)}
    for ln in lines:
        f = ln["figures"]
        for k in ("val_loss", "store_similarity", "usage_entropy", "needle_recall_at_1", "needle_recall_at_1_fresh"):
            assert isinstance(f[k], float), (k, f)
        assert ln["train"]["step"] == 3
    assert (out / "optimal_config_results.png").stat().st_size > 10_000
    assert "imm sweep: 4 points, ranked by needle recall@1" in r.stderr
    doc = json.loads(r.stdout)
    ranked = [p["figures"]["needle_recall_at_1"] for p in doc["points"]]
    assert ranked == sorted(ranked, reverse=True) and doc["best"] == doc["points"][0]["name"]
    assert len(doc["trained"]) == 4 and doc["skipped"] == []

    before = _mtimes(out)
    assert len(before) == 4
    r = imm(*args, "--json")
    assert r.code == 0, r.stderr
    assert "all points done, nothing to train" in r.stderr and "trained 0" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["trained"] == [] and doc["measured"] == [] and len(doc["skipped"]) == 4
    assert _mtimes(out) == before  # no model file was written again
    assert len(_lines(out)) == 4  # nothing appended


def test_stopped_sweep_goes_on_where_it_stopped(imm, tmp_path):
    out = tmp_path / "sw"
    base = ["sweep", "--block-size", "128", *SMALL, "--out", str(out)]
    assert imm(*base, "--slots", "4").code == 0
    first = _mtimes(out)
    # a point trained but not yet measured (stopped between training and sweep.jsonl): measured, not retrained
    name = next(iter(first))
    (out / "sweep.jsonl").write_text("")
    r = imm(*base, "--slots", "4,8", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    # the default memory is the episodic one, as `imm train`'s
    assert doc["trained"] == ["episodic-s8-b128-lr0.04-layer-tauto"]
    assert sorted(doc["measured"]) == sorted([name, "episodic-s8-b128-lr0.04-layer-tauto"])
    assert _mtimes(out)[name] == first[name]
    assert len(_lines(out)) == 2


def test_a_point_that_cannot_be_measured_gets_null_figures_with_a_note(imm, tmp_path, monkeypatch):
    """A point without memory (--slots 0) trains, and its store/usage/needle figures are null, each with a note."""
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "sw"
    r = imm("sweep", "--block-size", "32", "--slots", "0", *SMALL, "--out", str(out))
    assert r.code == 0, r.stderr
    (ln,) = _lines(out)
    assert ln["figures"]["needle_recall_at_1"] is None and isinstance(ln["figures"]["val_loss"], float)
    assert {n.split(":")[0] for n in ln["notes"]} == {"store", "usage", "needle"}
    assert "needle:" in r.stderr


def test_other_shared_settings_on_the_same_folder_are_refused(imm, tmp_path):
    out = tmp_path / "sw"
    assert imm("sweep", "--block-size", "32", "--slots", "4", *SMALL, "--out", str(out)).code == 0
    r = imm("sweep", "--block-size", "32", "--slots", "4", *SMALL[:-4], "--iters", "5", "--facts", FACTS, "--out", str(out))
    assert r.code == 2 and len(r.err_lines) == 1 and "--iters 3" in r.stderr


@pytest.mark.parametrize("args, msg", [
    (["--slots", "4,x"], "--slots"),
    (["--memory-temp", "warm"], "--memory-temp"),
    (["--rank-by", "speed"], "--rank-by"),
    (["--memory", "lstm"], "--memory"),
    (["--facts", "/no/such/facts.txt"], "--facts"),
])
def test_bad_sweep_flags_are_one_line(imm, tmp_path, args, msg):
    r = imm("sweep", *SMALL, *args, "--out", str(tmp_path / "sw"))
    assert r.code == 2 and len(r.err_lines) == 1 and msg in r.err_lines[0], r.stderr
    assert not (tmp_path / "sw" / "points").exists() or not any((tmp_path / "sw" / "points").iterdir())


def test_jsonl_line_after_a_torn_line_is_kept(tmp_path):
    (tmp_path / S.JSONL).write_text('{"name": "a", "figures": {}}\n{"name": "b", "fig')  # crash mid-append
    S.append_record(tmp_path, {"name": "c", "figures": {"val_loss": float("nan")}})
    done, skipped = S.read_records(tmp_path)
    assert sorted(done) == ["a", "c"] and done["c"]["figures"]["val_loss"] is None and skipped == 1


def test_ranking_puts_missing_figures_last_and_breaks_ties_by_val_loss():
    recs = [{"name": n, "figures": {"needle_recall_at_1": r, "val_loss": v}}
            for n, r, v in (("a", None, 1.0), ("b", 0.5, 2.0), ("c", 0.5, 1.5), ("d", 0.9, 3.0))]
    assert [r["name"] for r in S.rank(recs, "needle_recall_at_1")] == ["d", "c", "b", "a"]
    assert [r["name"] for r in S.rank(recs, "val_loss")] == ["a", "c", "b", "d"]


def test_a_point_trains_the_configs_imm_train_builds_from_the_same_flags():
    """Flags become configs in one place (config.FLAGS): a sweep point equals `imm train` with its flags."""
    from imm_cli.config import configs_from_flags

    s = S.SweepSettings(layers=1, heads=2, embd=32, iters=8, batch_size=8, seed=3, device="cpu")
    (p,) = S.grid(s)
    model_cfg, train_cfg = S.configs(p, s)
    flags = {"memory": "episodic", "slots": 8, "block_size": 128, "memory_lr": 0.04, "memory_norm": "layer", "memory_temp": None,
             "layers": 1, "heads": 2, "embd": 32, "iters": 8, "batch_size": 8, "seed": 3, "device": "cpu",
             "eval_every": 8, "save_every": 2}
    assert (model_cfg, train_cfg) == configs_from_flags(flags)
    assert model_cfg.memory.kind == "episodic" and model_cfg.memory.layer == -1


def test_linformer_only_settings_make_no_identical_points():
    """--memory-lr and --memory-norm act on linformer only: a mixed grid trains them for linformer and
    takes their first values for the other kinds (no identical trainings), and says so."""
    from imm_cli.experiments.sweep import SweepSettings, grid, ignored_note

    s = SweepSettings(memory=("linformer", "episodic"), slots=(4,), memory_lr=(0.04, 0.2), memory_norm=("layer", "l2"))
    pts = grid(s)
    assert sorted((p.memory_lr, p.memory_norm) for p in pts if p.memory == "linformer") == \
        [(0.04, "l2"), (0.04, "layer"), (0.2, "l2"), (0.2, "layer")]
    assert [(p.memory_lr, p.memory_norm) for p in pts if p.memory == "episodic"] == [(0.04, "layer")]
    assert "episodic points take their first values" in ignored_note(s)
    assert ignored_note(SweepSettings(memory=("linformer",), memory_lr=(0.04, 0.2))) is None
