"""`imm recall`: facts shown once at inference, then completed from their two-word cue."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from imm_cli import runs
from imm_cli.cli.common import _clean, console, handle_errors, print_json
from imm_cli.cli.store import check_out  # the run folder by default, checked
from imm_cli.experiments.recall import run_recall
from imm_cli.experiments.setup import open_facts, open_run


@handle_errors
def recall(
    run: Path = typer.Option(..., help="Run folder made by `imm train` (with memory)."),
    facts: Path = typer.Option(..., help="Facts file, one per line; the cue is the first two words (e.g. examples/facts.txt)."),
    context: int = typer.Option(32, help="Bytes of other text before the cue in the test context."),
    seed: int = typer.Option(0, help="Seed of the test contexts."),
    out: Optional[Path] = typer.Option(None, help="Folder for recall.json and context_influence.png [default: the run folder]."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps or auto."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show each fact once (memory updates on), then complete each cue with the memory frozen."""
    out_dir = check_out(run, out)
    model, _, text = open_run(run, device)
    fact_list = open_facts(facts, model)
    result = run_recall(model, fact_list, text, seed=seed, context=context)
    doc = {"run": str(run), "facts_file": str(facts), **_clean(result.to_dict())}
    from imm_cli.plots.recall import plot_context_influence

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "recall.json"), "plot": str(out_dir / "context_influence.png")}
    plot_context_influence(doc, out_dir / "context_influence.png")
    runs.atomic_write_json(out_dir / "recall.json", {**doc, "files": files})
    _print(doc)
    console.print("files: " + ", ".join(files.values()))
    if json_out:
        print_json({**doc, "files": files})


def _print(r: dict) -> None:
    t = Table(title=f"recall: {r['settings']['facts']} facts shown once ({r['model']['memory']}, {r['model']['slots']} slots)")
    for col in ("cue", "expected", "generated (memory)", "exact", "char acc", "loss/byte", "generated (fresh)", "char acc", "loss/byte"):
        t.add_column(col, justify="right" if col in ("char acc", "loss/byte", "exact") else "left")
    for f in r["facts"]:
        t.add_row(f["cue"], f["expected"], f["generated"], "✓" if f["exact"] else "✗", f"{f['char_accuracy']:.2f}",
                  f"{f['loss_per_byte']:.2f}", f["generated_fresh"], f"{f['char_accuracy_fresh']:.2f}", f"{f['loss_per_byte_fresh']:.2f}")
    console.print(t)
    s = Table(title="summary")
    for col in ("condition", "exact match", "char accuracy", "loss/byte"):
        s.add_column(col, justify="left" if col == "condition" else "right")
    for name, label in (("memory", "memory written with the facts"), ("fresh", "fresh memory (control)")):
        m = r["summary"][name]
        s.add_row(label, f"{m['exact_match']:.2f}", f"{m['char_accuracy']:.2f}", f"{m['loss_per_byte']:.3f}")
    console.print(s)
    ci = r["context_influence"]
    console.print(f"context influence, KL(read on || read off): {ci['mean_kl_rest']:.3f} nats/byte on the facts' rests, "
                  f"{ci['mean_kl_prompt']:.3f} on the prompts")
    console.print(f"[bold]verdict:[/] {r['verdict']}  ({r['seconds']:.1f} s)")
