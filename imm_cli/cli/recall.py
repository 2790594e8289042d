"""`imm recall`: facts shown once at inference, then completed from their two-word cue."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from imm_cli import runs
from imm_cli.cli.common import _clean, budget_label, console, handle_errors, knn_label, mark_outputs, print_json, safe
from imm_cli.cli.store import open_with_facts, with_fact_options
from imm_cli.experiments.misses import summary_line
from imm_cli.experiments.recall import run_recall

RECALL_FILES = ("recall.json", "context_influence.png")


@handle_errors
@with_fact_options
def recall(
    context: int = typer.Option(32, help="Bytes of other text before the cue in the test context."),
    placement: str = typer.Option("line", help="line: the facts one per line, cues at line starts; prose: each fact inside a line of running text, its cue after other words on its line."),
    seed: int = typer.Option(0, help="Seed of the test contexts."),
    *, run: Path, facts: Path, out: Optional[Path], device: str, force: bool, json_out: bool, **inference,
) -> None:
    """Show each fact once (memory updates on), then complete each cue with the memory frozen."""
    with open_with_facts(run, facts, out, "recall", RECALL_FILES, force, device, seed, inference) as (out_dir, model, text, fact_list):
        result = run_recall(model, fact_list, text, seed=seed, context=context, placement=placement)
        doc = {"run": str(run), "facts_file": str(facts), **_clean(result.to_dict())}
        from imm_cli.plots.recall import plot_context_influence

        out_dir.mkdir(parents=True, exist_ok=True)
        with runs.locked(out_dir):
            files = {"json": str(out_dir / "recall.json"), "plot": str(out_dir / "context_influence.png")}
            plot_context_influence(doc, out_dir / "context_influence.png")
            runs.atomic_write_json(out_dir / "recall.json", {**doc, "files": files})
            mark_outputs(out_dir, list(RECALL_FILES), "recall")
    _print(doc)
    console.print(safe("files: " + ", ".join(files.values())))
    if json_out:
        print_json({**doc, "files": files})


def _print(r: dict) -> None:
    t = Table(title=f"recall: {r['settings']['facts']} facts shown once, {r['settings']['placement']} placement "
                    f"({r['model']['memory']}, {r['model']['slots']} slots{budget_label(r['model'])}{knn_label(r['model'])})")
    for col in ("cue", "expected", "generated (memory)", "exact", "char acc", "loss/byte", "generated (fresh)", "char acc", "loss/byte"):
        t.add_column(col, justify="right" if col in ("char acc", "loss/byte", "exact") else "left")
    for f in r["facts"]:
        t.add_row(safe(f["cue"]), safe(f["expected"]), safe(f["generated"]), "✓" if f["exact"] else "✗", f"{f['char_accuracy']:.2f}",
                  f"{f['loss_per_byte']:.2f}", safe(f["generated_fresh"]), f"{f['char_accuracy_fresh']:.2f}", f"{f['loss_per_byte_fresh']:.2f}")
    console.print(t)
    s = Table(title="summary")
    for col in ("condition", "exact match", "char accuracy", "loss/byte"):
        s.add_column(col, justify="left" if col == "condition" else "right")
    for name, label in (("memory", "memory written with the facts"), ("fresh", "fresh memory (control)"),
                        ("other_facts", "memory of the other half of the facts (control)")):
        m = r["summary"][name]
        s.add_row(label, f"{m['exact_match']:.2f}", f"{m['char_accuracy']:.2f}", f"{m['loss_per_byte']:.3f}")
    console.print(s)
    ci = r["context_influence"]
    console.print(f"context influence, KL(read on || read off): {ci['mean_kl_rest']:.3f} nats/byte on the facts' rests, "
                  f"{ci['mean_kl_prompt']:.3f} on the prompts")
    if r.get("misses"):
        console.print(f"why the memory missed: {summary_line(r['misses'])}")
    for note in r.get("notes", []):
        console.print(f"note: {safe(note)}")
    console.print(safe(f"verdict: {r['verdict']}  ({r['seconds']:.1f} s)"))
