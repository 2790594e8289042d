"""`imm store` and `imm usage` end to end through CliRunner, on tiny trained runs of both memory kinds."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from imm_cli.cli.app import app

TINY = ["--layers", "1", "--heads", "2", "--embd", "32", "--block-size", "32", "--batch-size", "8",
        "--iters", "3", "--eval-every", "3", "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"
SEQ = 50


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        return CliRunner()


def _train(path, *flags) -> None:
    r = _runner().invoke(app, ["train", *TINY, *flags, "--out", str(path)])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    made = {}
    for name, flags in (("episodic", ["--slots", "4"]), ("linformer", ["--slots", "4", "--memory", "linformer"]),
                        ("none", ["--slots", "0"])):
        _train(base / name, *flags)
        made[name] = base / name
    return made


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def _invoke(*args):
    r = _runner().invoke(app, list(args))
    return r


@pytest.mark.parametrize("kind", ["episodic", "linformer"])
def test_store_and_usage_end_to_end(runs, kind, tmp_path):
    run = runs[kind]
    out = tmp_path / "out"
    r = _invoke("store", "--run", str(run), "--json", "--out", str(out))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    for key in ("per_sequence", "mean", "std", "best_slot_mean", "slot_cosine", "controls", "nonfinite"):
        assert key in s
    assert len(s["per_sequence"]) == SEQ
    assert all(v is not None and -1.0 <= v <= 1.0 for v in s["per_sequence"])
    assert -1.0 <= s["mean"] <= 1.0 and s["std"] >= 0 and -1.0 <= s["best_slot_mean"] <= 1.0
    assert s["slot_cosine"] is None or -1.0 <= s["slot_cosine"] <= 1.0
    assert len(s["slot_cosine_matrix"]) == 4
    for name in ("initial", "random"):
        assert {"mean", "std"} <= set(s["controls"][name])
    assert abs(s["controls"]["random"]["mean"]) < 0.2
    if kind == "episodic":  # an empty initial memory: the control is undefined, never a silent 0
        assert s["controls"]["initial"]["mean"] is None
    else:
        assert -1.0 <= s["controls"]["initial"]["mean"] <= 1.0
    assert s["nonfinite"] is False
    assert 0 < s["memory"]["memory_share"] < 1
    assert _is_png(out / "pattern_similarity.png")
    assert json.loads((out / "store.json").read_text())["mean"] == pytest.approx(s["mean"])
    assert not (out / "optimal_config_results.png").exists()  # only one result so far

    r = _invoke("usage", "--run", str(run), "--json", "--out", str(out))
    assert r.exit_code == 0, r.output
    u = json.loads(r.stdout)
    for key in ("usage", "entropy", "min_max_ratio", "cv", "dead_slots", "dominant_slots", "gates"):
        assert key in u
    assert len(u["usage"]) == SEQ and all(len(row) == 4 for row in u["usage"])
    rows = [row for row in u["usage"] if None not in row]
    assert len(rows) == SEQ - u["undefined_rows"] and len(rows) >= SEQ - 1
    for row in rows:
        assert sum(row) / 4 == pytest.approx(1.0)
        assert all(v >= 0 for v in row)
    assert 0.0 <= u["entropy"] <= 1.0 and 0.0 <= u["min_max_ratio"] <= 1.0 and u["cv"] >= 0
    assert len(u["gates"]) == 1 and 0.0 <= u["gates"][0]["mean"] <= 1.0 and u["gates"][0]["std"] >= 0
    if kind == "episodic":  # slots are regions of the entry buffer, filled from its start: regions never
        # written are named as such, not left to look like slots the model stopped using
        never = [n for n in u["notes"] if "never held an entry" in n]
        filled = u["retention"]["entries"] * 4 // u["retention"]["budget"]
        assert bool(never) == (u["retention"]["entries"] < u["retention"]["budget"] * 3 // 4 + 1), (never, u["retention"])
        if never:
            assert all(str(j) in never[0] for j in range(filled + 1, 4))
    assert _is_png(out / "slot_usage_heatmap.png")
    assert _is_png(out / "optimal_config_results.png")  # both results now exist
    assert (out / "usage.json").is_file()


def test_rich_tables_default_out_and_options(runs, tmp_path):
    run = runs["linformer"]
    r = _invoke("store", "--run", str(run), "--sequences", "10", "--random-tokens", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # tables go to stderr; stdout is kept for --json
    assert "pattern similarity" in r.stderr and "random unit vectors" in r.stderr
    saved = json.loads((run / "store.json").read_text())
    assert len(saved["per_sequence"]) == 10 and saved["random_tokens"] is True and saved["seed"] == 3
    r = _invoke("usage", "--run", str(run), "--sequences", "10")
    assert r.exit_code == 0, r.output
    assert "normalised entropy" in r.stderr and "read gate" in r.stderr
    assert _is_png(run / "optimal_config_results.png")


@pytest.mark.parametrize("cmd", ["store", "usage"])
def test_no_memory_refused(runs, cmd, tmp_path):
    out = tmp_path / "o"
    before = sorted(p.name for p in runs["none"].iterdir())
    r = _invoke(cmd, "--run", str(runs["none"]), "--out", str(out), "--json")
    assert r.exit_code == 2
    assert r.stdout == ""
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "no memory" in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in runs["none"].iterdir()) == before


@pytest.mark.parametrize("args,words", [
    (["--sequences", "0"], "--sequences"),
    (["--sequences", "100000"], "validation split"),
])
def test_bad_flags_refused(runs, args, words, tmp_path):
    r = _invoke("store", "--run", str(runs["episodic"]), "--out", str(tmp_path / "o"), *args)
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_run_refused(tmp_path):
    r = _invoke("usage", "--run", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "does not exist" in r.stderr
