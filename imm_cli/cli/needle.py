"""`imm needle`: a fact seen once inside other text, recalled later from its cue (with controls)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from imm_cli import runs
from imm_cli.cli.common import _clean, budget_label, console, handle_errors, knn_label, mark_outputs, parse_list, print_json, safe
from imm_cli.cli.store import open_with_facts, with_fact_options
from imm_cli.errors import InputError
from imm_cli.experiments.misses import CAUSES
from imm_cli.experiments.needle import CONDITIONS, NeedleSettings, check_settings, run_needle
from imm_cli.facts import load_facts

D = NeedleSettings()
NEEDLE_FILES = ("needle.json", "needle_heatmap.png", "capacity.png", "distance.png")
MAX_TRIALS = 100  # haystack draws: each is a full pass over the facts


@handle_errors
@with_fact_options
def needle(
    length: int = typer.Option(D.length, help="Haystack length in bytes around each fact."),
    depth: float = typer.Option(D.depth, help="Where the fact sits in its haystack: 0 = start, 1 = end."),
    trials: int = typer.Option(D.trials, help="Haystack draws; figures are mean and std over them."),
    context: int = typer.Option(D.context, help="Bytes of other text before the cue in the test context."),
    placement: str = typer.Option(",".join(D.placements), help="line (the fact and its cue on lines of their own), prose (inside running text, the cue after other words on its line), or both as line,prose; the first is the headline and the sweeps'."),
    lengths: str = typer.Option(",".join(map(str, D.lengths)), help="Heatmap haystack lengths in bytes (up to 65536), comma-separated."),
    depths: str = typer.Option(",".join(f"{d:g}" for d in D.depths), help="Heatmap depths, comma-separated."),
    distance: str = typer.Option(",".join(map(str, D.distance)), help="Distance curve: haystack lengths in bytes with the fact at depth 0 (up to 65536), comma-separated."),
    document: str = typer.Option(",".join(map(str, D.document)), help="Capacity curve: numbers of facts spread through one text written into one memory (capped at the facts given), comma-separated."),
    spacing: int = typer.Option(D.spacing, help="Bytes of text per fact in the capacity document."),
    sweeps: bool = typer.Option(True, "--sweeps/--no-sweeps", help="Run the heatmap, the distance curve and the capacity document."),
    seed: int = typer.Option(D.seed, help="Seed of haystacks and test contexts."),
    *, run: Path, facts: Path, out: Optional[Path], device: str, force: bool, json_out: bool, **inference,
) -> None:
    """Needle in a haystack: memory vs fresh memory vs other facts vs fact in the window."""
    settings = NeedleSettings(
        length=length, depth=depth, trials=trials, context=context, seed=seed, sweeps=sweeps,
        placements=tuple(parse_list(placement, str, "--placement")),
        lengths=tuple(parse_list(lengths, int, "--lengths")), depths=tuple(parse_list(depths, float, "--depths")),
        distance=tuple(parse_list(distance, int, "--distance")), document=tuple(parse_list(document, int, "--document")),
        spacing=spacing,
    )
    if not 1 <= trials <= MAX_TRIALS:
        raise InputError(f"--trials must be between 1 and {MAX_TRIALS} (got {trials})")
    check_settings(settings, load_facts(facts))  # the file first: a missing one is named as such
    with open_with_facts(run, facts, out, "needle", NEEDLE_FILES, force, device, seed, inference) as (out_dir, model, text, fact_list):
        with console.status("needle: writing haystacks and testing recall"):
            result = run_needle(model, fact_list, text, settings)
        doc = {"run": str(run), "facts_file": str(facts), **_clean(result.to_dict())}
        files = _save(doc, out_dir, settings.sweeps)
    _print(result.to_dict(), files)
    if json_out:
        print_json({**doc, "files": files})


def _save(doc: dict, out: Path, sweeps: bool) -> dict:
    from imm_cli.plots.recall import plot_capacity, plot_distance, plot_needle_heatmap

    out.mkdir(parents=True, exist_ok=True)
    with runs.locked(out):
        files = {"json": str(out / "needle.json")}
        if sweeps:
            plot_needle_heatmap(doc, out / "needle_heatmap.png")
            plot_capacity(doc, out / "capacity.png")
            plot_distance(doc, out / "distance.png")
            files.update(heatmap=str(out / "needle_heatmap.png"), capacity=str(out / "capacity.png"),
                         distance=str(out / "distance.png"))
        runs.atomic_write_json(out / "needle.json", {**doc, "files": files})
        mark_outputs(out, [Path(f).name for f in files.values()], "needle")
    return files


def _pm(c: dict | None, key: str) -> str:
    return "n/a" if c is None else f"{c[key]:.2f} ± {c[key + '_std']:.2f}"


LABEL = {"memory": "memory (fact written once)", "fresh": "fresh memory", "other_facts": "another fact's memory",
         "in_context": "fact in window (upper bound)", "text_only": "the text without its facts"}


def _conditions_table(title: str, conds: dict) -> Table:
    t = Table(title=title)
    for col in ("condition", "exact match", "char accuracy", "loss/byte", "recall@1"):
        t.add_column(col, justify="left" if col == "condition" else "right")
    total = max((c or {}).get("facts", 0) for c in conds.values())
    for cond in CONDITIONS:
        c = conds[cond]
        label = LABEL[cond]
        if c is not None and 0 < c.get("facts", total) < total:  # the in-window control: only the facts that fit
            label += f", {c['facts']} of {total} facts"
        t.add_row(label, _pm(c, "exact_match"), _pm(c, "char_accuracy"), _pm(c, "loss_per_byte"), _pm(c, "recall_at_1"))
    return t


def _curve_table(title: str, x_name: str, xs: list, curve: dict, conds: tuple[str, ...]) -> Table:
    t = Table(title=title)
    t.add_column(x_name, justify="right")
    for c in conds:
        t.add_column(f"{LABEL[c]}: exact", justify="right")
    t.add_column("memory: char acc.", justify="right")
    for i, x in enumerate(xs):
        t.add_row(f"{x:,}", *[f"{curve[c]['exact_match'][i]:.2f}" for c in conds], f"{curve['memory']['char_accuracy'][i]:.2f}")
    return t


def _misses_table(r: dict) -> Table:
    """Why the memory condition missed, per experiment: each miss's cause at its first wrong byte."""
    t = Table(title="why the memory missed: each miss at its first wrong byte (imm_cli/experiments/misses.py)")
    t.add_column("experiment")
    t.add_column("misses", justify="right")
    for c in CAUSES:
        t.add_column(c.replace("_", " "), justify="right")
    rows = [(f"needle, {place}", m) for place, m in r.get("misses", {}).items()]
    for key, x_name, fmt in (("distance", "lengths", "distance {:,} bytes"), ("capacity", "n_facts", "document, {} facts")):
        curve = r.get(key) or {}
        rows += [(fmt.format(x), m) for x, m in zip(curve.get(x_name, []), curve.get("misses", []))]
    for name, m in rows:
        t.add_row(name, f"{m['misses']} of {m['rows']}", *[str(m["causes"][c]) for c in CAUSES])
    return t


def _print(r: dict, files: dict) -> None:
    s, m = r["settings"], r["model"]
    for place, conds in r["placements"].items():
        console.print(_conditions_table(
            f"needle ({place}): {s['facts']} facts, haystack {s['length']} bytes, depth {s['depth']:g}, {s['trials']} trials "
            f"({m['memory']}, {m['slots']} slots{budget_label(m)}{knn_label(m)})", conds))
    ft = Table(title=f"per fact (first trial, {s['placements'][0]})")
    for col in ("cue", "expected", "memory", "", "fresh memory", "in window"):
        ft.add_column(col)
    for f in r["facts"]:
        c = f["conditions"]
        ic = c["in_context"]
        ft.add_row(safe(f["cue"]), safe(f["expected"]), safe(c["memory"]["generated"]), "✓" if c["memory"]["exact"] else "✗",
                   safe(c["fresh"]["generated"]), "(does not fit)" if ic is None else safe(ic["generated"]))
    console.print(ft)
    if r.get("heatmap"):
        hm = r["heatmap"]
        ht = Table(title=f"exact match, memory condition: haystack length x depth ({hm['placement']})")
        ht.add_column("length")
        for d in hm["depths"]:
            ht.add_column(f"depth {d:g}", justify="right")
        for L, row in zip(hm["lengths"], hm["exact_match"]):
            ht.add_row(f"{L:,}", *[f"{v:.2f}" for v in row])
        console.print(ht)
        d = r["distance"]
        console.print(_curve_table(f"distance: the fact at depth 0, then this many bytes of text ({d['placement']})",
                                   "haystack bytes", d["lengths"], d, ("memory", "fresh", "other_facts")))
        cap = r["capacity"]
        console.print(_curve_table(f"capacity: N facts spread through one text ({cap['spacing']} bytes each) in one memory "
                                   f"of {cap['memory_size'] or '-'} entries ({cap['placement']})",
                                   "facts", cap["n_facts"], cap, ("memory", "fresh", "text_only")))
    console.print(_misses_table(r))
    for note in r.get("notes", []):
        console.print(f"note: {safe(note)}")
    console.print(f"[bold]verdict:[/] {escape(r['verdict'])}  ({r['seconds']:.1f} s)")
    console.print(safe("files: " + ", ".join(files.values())))
