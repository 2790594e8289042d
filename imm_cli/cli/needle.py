"""`imm needle`: a fact seen once inside other text, recalled later from its cue (with controls)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from imm_cli import runs
from imm_cli.cli.common import _clean, check_seed, console, handle_errors, holding, mark_outputs, parse_list, print_json, safe
from imm_cli.cli.store import FORCE_HELP, check_out  # the run folder by default, checked
from imm_cli.errors import InputError
from imm_cli.experiments.needle import CONDITIONS, NeedleSettings, run_needle
from imm_cli.experiments.setup import open_facts, open_run
from imm_cli.facts import load_facts

D = NeedleSettings()
NEEDLE_FILES = ("needle.json", "needle_heatmap.png", "capacity.png")
MAX_TRIALS = 1000  # haystack draws: each is a full pass over the facts
MAX_FACTS_STORED = 4096  # --capacity: facts written into one memory


@handle_errors
def needle(
    run: Path = typer.Option(..., help="Run folder made by `imm train`."),
    facts: Path = typer.Option(..., help="Facts file, one per line; the cue is the first two words (e.g. examples/facts.txt)."),
    length: int = typer.Option(D.length, help="Haystack length in bytes around each fact."),
    depth: float = typer.Option(D.depth, help="Where the fact sits in its haystack: 0 = start, 1 = end."),
    trials: int = typer.Option(D.trials, help="Haystack draws; figures are mean and std over them."),
    context: int = typer.Option(D.context, help="Bytes of other text before the cue in the test context."),
    lengths: str = typer.Option(",".join(map(str, D.lengths)), help="Heatmap haystack lengths, comma-separated."),
    depths: str = typer.Option(",".join(f"{d:g}" for d in D.depths), help="Heatmap depths, comma-separated."),
    capacity: str = typer.Option(",".join(map(str, D.capacity)), help="Facts stored in one memory for the capacity curve, comma-separated."),
    sweeps: bool = typer.Option(True, "--sweeps/--no-sweeps", help="Run the length x depth heatmap and the capacity curve."),
    seed: int = typer.Option(D.seed, help="Seed of haystacks and test contexts."),
    out: Optional[Path] = typer.Option(None, help="Folder for needle.json and the plots [default: the run folder]."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps or auto."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Needle in a haystack: memory vs fresh memory vs other facts vs fact in the window."""
    settings = NeedleSettings(
        length=length, depth=depth, trials=trials, context=context, seed=seed, sweeps=sweeps,
        lengths=tuple(parse_list(lengths, int, "--lengths")), depths=tuple(parse_list(depths, float, "--depths")),
        capacity=tuple(parse_list(capacity, int, "--capacity")),
    )
    if not 1 <= trials <= MAX_TRIALS:
        raise InputError(f"--trials must be between 1 and {MAX_TRIALS} (got {trials})")
    if not all(1 <= n <= MAX_FACTS_STORED for n in settings.capacity):
        raise InputError(f"--capacity values must be between 1 and {MAX_FACTS_STORED} (got {capacity})")
    check_seed(seed)
    out_dir = check_out(run, out, "needle", NEEDLE_FILES, force)
    load_facts(facts)  # the file and its lines before any work (whether they fit the model: open_facts)
    with holding(out_dir):
        model, _, text = open_run(run, device)
        fact_list = open_facts(facts, model)
        with console.status("needle: writing haystacks and testing recall"):
            result = run_needle(model, fact_list, text, settings)
        doc = {"run": str(run), "facts_file": str(facts), **_clean(result.to_dict())}
        files = _save(doc, out_dir, settings.sweeps)
    _print(result.to_dict(), files)
    if json_out:
        print_json({**doc, "files": files})


def _save(doc: dict, out: Path, sweeps: bool) -> dict:
    from imm_cli.plots.recall import plot_capacity, plot_needle_heatmap

    out.mkdir(parents=True, exist_ok=True)
    with runs.locked(out):
        files = {"json": str(out / "needle.json")}
        if sweeps:
            plot_needle_heatmap(doc, out / "needle_heatmap.png")
            plot_capacity(doc, out / "capacity.png")
            files.update(heatmap=str(out / "needle_heatmap.png"), capacity=str(out / "capacity.png"))
        runs.atomic_write_json(out / "needle.json", {**doc, "files": files})
        mark_outputs(out, [Path(f).name for f in files.values()], "needle")
    return files


def _pm(c: dict, key: str) -> str:
    return f"{c[key]:.2f} ± {c[key + '_std']:.2f}"


def _print(r: dict, files: dict) -> None:
    s = r["settings"]
    t = Table(title=f"needle: {s['facts']} facts, haystack {s['length']} bytes, depth {s['depth']:g}, {s['trials']} trials "
                    f"({r['model']['memory']}, {r['model']['slots']} slots)")
    for col in ("condition", "exact match", "char accuracy", "loss/byte", "recall@1"):
        t.add_column(col, justify="left" if col == "condition" else "right")
    label = {"memory": "memory (fact written once)", "fresh": "fresh memory", "other_facts": "memory with other facts",
             "in_context": "fact in window (upper bound)"}
    for cond in CONDITIONS:
        c = r["conditions"][cond]
        t.add_row(label[cond], _pm(c, "exact_match"), _pm(c, "char_accuracy"), _pm(c, "loss_per_byte"), _pm(c, "recall_at_1"))
    console.print(t)
    ft = Table(title="per fact (first trial)")
    for col in ("cue", "expected", "memory", "", "fresh memory", "in window"):
        ft.add_column(col)
    for f in r["facts"]:
        c = f["conditions"]
        ft.add_row(safe(f["cue"]), safe(f["expected"]), safe(c["memory"]["generated"]), "✓" if c["memory"]["exact"] else "✗",
                   safe(c["fresh"]["generated"]), safe(c["in_context"]["generated"]))
    console.print(ft)
    if r.get("heatmap"):
        hm = r["heatmap"]
        ht = Table(title="exact match, memory condition: haystack length x depth")
        ht.add_column("length")
        for d in hm["depths"]:
            ht.add_column(f"depth {d:g}", justify="right")
        for L, row in zip(hm["lengths"], hm["exact_match"]):
            ht.add_row(str(L), *[f"{v:.2f}" for v in row])
        console.print(ht)
        cap = r["capacity"]
        ct = Table(title="capacity: facts written into one memory")
        for col in ("facts", "memories", "exact match", "char accuracy"):
            ct.add_column(col, justify="right")
        for n, g, em, ca in zip(cap["n_facts"], cap["memories"], cap["exact_match"], cap["char_accuracy"]):
            ct.add_row(str(n), str(g), f"{em:.2f}", f"{ca:.2f}")
        console.print(ct)
    console.print(f"[bold]verdict:[/] {escape(r['verdict'])}  ({r['seconds']:.1f} s)")
    console.print(safe("files: " + ", ".join(files.values())))
