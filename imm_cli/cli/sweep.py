"""`imm sweep`: a grid of memory configurations, each a short training plus the store, usage and needle figures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from imm_cli.cli.common import (check_out_folder, check_outputs, check_seed, console, fmt, handle_errors, mark_outputs,
                                parse_list, print_json, safe, started_on_demand, with_options)
from imm_cli.cli.flags import option
from imm_cli.errors import InputError
from imm_cli.experiments.sweep import FIGURES, JSONL, PLOT, SETTINGS, SweepSettings, label, run_sweep, varying

D = SweepSettings()
DEFAULT_FACTS = Path("examples/facts.txt")


def _temp(text: str) -> float | None:
    return None if text.strip().lower() == "auto" else float(text)


def _temps(text: str) -> list:
    try:
        items = [_temp(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--memory-temp must be a comma-separated list of numbers or 'auto' (got {text!r})") from None
    if not items:
        raise InputError("--memory-temp is empty")
    return items


SWEPT = "Comma-separated: one point per value, the grid every combination."
SWEEP_FLAGS = [
    *(option(flag, getattr(D, flag), SWEPT, listed=True) for flag in ("slots", "memory", "block_size", "memory_lr", "memory_norm")),
    option("memory_temp", D.memory_temp, SWEPT + " auto = the kind's default.", listed=True),
    *(option(flag, getattr(D, flag), "(Every point.)") for flag in ("iters", "layers", "heads", "embd", "batch_size", "seed", "data")),
]


@handle_errors
@with_options(SWEEP_FLAGS)
def sweep(
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps, for training and the needle test."),
    facts: Optional[Path] = typer.Option(None, help="Facts for the needle figures [default: examples/facts.txt when it exists]."),
    sequences: int = typer.Option(D.sequences, help="Sequences walked by the store and usage figures."),
    rank_by: str = typer.Option("needle_recall_at_1", help=f"Figure that ranks the points, ties by validation loss: {', '.join(FIGURES)}."),
    out: Path = typer.Option(Path("runs/sweep"), help="Sweep folder; running again on it goes on where it stopped."),
    force: bool = typer.Option(False, "--force", help="Use an --out folder holding files of the same names that imm did not write."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    **flags,
) -> None:
    """Grid over memory settings: short trainings ranked by needle recall@1 (then validation loss); resumable."""
    if facts is None:
        if not DEFAULT_FACTS.is_file():
            raise InputError("--facts is required (examples/facts.txt is not in this folder)")
        facts = DEFAULT_FACTS
    from imm_cli.facts import load_facts

    try:  # the file and its lines, before any training (whether they fit a point's block is per point)
        load_facts(facts)
    except InputError as e:
        raise InputError(f"--facts: {e}") from None
    seed, data = flags["seed"], flags["data"]
    check_seed(seed)
    if rank_by not in FIGURES:
        raise InputError(f"--rank-by must be one of {', '.join(FIGURES)} (got {rank_by!r})")
    if sequences < 2:
        raise InputError(f"--sequences must be >= 2 (got {sequences})")
    from imm_cli.train import resolve_device

    resolve_device(device)
    if data is not None:
        from imm_cli.data import read_text_file

        read_text_file(data, what="data file")
    check_out_folder(out)
    if not (out / SETTINGS).exists():  # not an earlier sweep: replace nothing imm did not write
        check_outputs(out, (JSONL, SETTINGS, PLOT, "points"), "sweep", force)
    grid = {flag: tuple(parse_list(flags[flag], kind, "--" + flag.replace("_", "-")))
            for flag, kind in (("slots", int), ("block_size", int), ("memory_lr", float), ("memory_norm", str), ("memory", str))}
    fixed = {flag: flags[flag] for flag in ("iters", "layers", "heads", "embd", "batch_size", "seed")}
    settings = SweepSettings(**grid, memory_temp=tuple(_temps(flags["memory_temp"])), **fixed, device=device,
                             data=str(data.resolve()) if data is not None else None, sequences=sequences)
    result = _with_progress(lambda cb: run_sweep(settings, out, facts, rank_by, cb))
    files = {"jsonl": str(out / "sweep.jsonl")}
    if result.points:
        from imm_cli.plots.sweep import plot_sweep

        from imm_cli import runs

        with runs.locked(out):
            plot_sweep(result.points, rank_by, out / PLOT)
            mark_outputs(out, [JSONL, SETTINGS, PLOT, "points"], "sweep")
        files["plot"] = str(out / PLOT)
    _print(result, files)
    if json_out:
        print_json({**result.to_dict(), "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.__dict__.items()},
                    "facts": str(facts), "files": files})
    if result.interrupted:
        console.print(escape(f"stopped; finished points are in {out / 'sweep.jsonl'}. Go on with the same command."),
                      soft_wrap=True, highlight=False)
        raise typer.Exit(130)


def _none(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _with_progress(run):
    progress = Progress(TextColumn("[bold]{task.fields[point]}[/]"), BarColumn(), TaskProgressColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console, transient=True)
    task = None

    def on_event(e: dict) -> None:
        nonlocal task
        t = e["type"]
        if t == "sweep":
            done = f", {e['done']} already done" if e["done"] else ""
            console.print(f"sweep: {e['points']} point{'s' if e['points'] != 1 else ''}{done}" + ("" if e["todo"] else ": all points done, nothing to train"))
        elif t == "point":
            console.print(safe(f"point {e['index']}/{e['points']}: {e['point']}"))
            task = None
        elif t == "start":
            start_progress()
            task = progress.add_task("train", total=None, completed=e["step"], point="  train", loss="-")
        elif t == "step" and task is not None:
            progress.update(task, total=e["iters"], completed=e["step"], loss=f"{e['loss']:.3f}")
        elif t == "measure":
            if task is not None:
                progress.remove_task(task)
                task = None
            console.print("  measuring: store, usage, needle")
        elif t == "warning":
            console.print(f"[yellow]warning:[/] {escape(e['message'])}")

    with started_on_demand(progress) as start_progress:
        return run(on_event)


def _print(r, files: dict) -> None:
    recs = r.points
    dims = varying(recs)
    t = Table(title=f"imm sweep: {len(recs)} points, ranked by {FIGURES[r.rank_by][0]} (then validation loss)")
    cols = ["#", "point", "val loss (ablated)", "curric. recall", "pattern sim (init)", "usage entropy", "dead",
            "needle r@1 (fresh)", "exact", "train s"]
    for c in cols:
        t.add_column(c, justify="left" if c == "point" else "right")
    for i, rec in enumerate(recs, 1):
        f = rec["figures"]
        pair = lambda a, b, d=2: "-" if _none(f.get(a)) else f"{fmt(f.get(a), d)} ({'-' if _none(f.get(b)) else fmt(f.get(b), d)})"  # noqa: E731
        t.add_row(
            ("★ " if i == 1 else "") + str(i), label(rec, dims) + ("  *" if rec["notes"] else ""),
            pair("val_loss", "val_loss_ablated", 3), fmt(f.get("recall_acc"), 2),
            pair("store_similarity", "store_similarity_initial"), fmt(f.get("usage_entropy"), 2),
            "-" if f.get("usage_dead_slots") is None else str(f["usage_dead_slots"]),
            pair("needle_recall_at_1", "needle_recall_at_1_fresh"), fmt(f.get("needle_exact_match"), 2),
            f"{rec['seconds']['train']:.1f}" if rec["seconds"].get("train") else "-",
        )
    console.print(t)
    for n in r.notes:
        console.print(escape(f"note: {n}"), soft_wrap=True, highlight=False)
    for rec in recs:
        for n in rec["notes"]:
            console.print(escape(f"* {rec['name']}: {' '.join(n.split())}"), soft_wrap=True, highlight=False)
    if recs:
        console.print(f"[bold]best:[/] {escape(recs[0]['name'])}  ({escape(recs[0]['run'])})")
    console.print(f"this call: trained {len(r.trained)}, measured {len(r.measured)}, already done {len(r.skipped)} "
                  f"({r.seconds:.1f} s)")
    console.print("files: " + ", ".join(files.values()))
