"""`imm compare`: several runs side by side (cost, loss, recall, storage, usage, speed), one table and one figure."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from imm_cli import runs
from imm_cli.cli.common import check_out_folder, check_outputs, console, fmt, handle_errors, holding, mark_outputs, print_json
from imm_cli.cli.store import FORCE_HELP
from imm_cli.errors import InputError
from imm_cli.experiments.compare import CONDITIONS, STORE_CONTROLS, CompareSettings, check_facts_file, compare as compare_runs

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"
D = CompareSettings()
NOT_RUN = "not run"
NONE = "—"  # a figure that does not exist for this run (no memory)
LABEL = {"memory": "memory", "fresh": "fresh memory", "other_facts": "other facts", "in_context": "fact in window"}
CONTROL_LABEL = {"other_sequence": "vs another sequence", "initial": "initial memory", "random": "random vectors"}


@handle_errors
def compare(
    run_dirs: Optional[List[Path]] = typer.Argument(None, metavar="RUN", help="Run folders made by `imm train` (one or more)."),
    facts: Path = typer.Option(D.facts, help="Facts file for needle where a run has no needle.json yet (relative to the current folder)."),
    run_missing: bool = typer.Option(True, "--run/--no-run", help="Run store, usage and needle (defaults) where a run lacks their JSON; --no-run shows 'not run'."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Time training steps against the same config with --slots 0 (paired rounds)."),
    speed_seconds: float = typer.Option(D.speed_seconds, help="Seconds of paired speed rounds per run (at least 3 rounds are timed however small; --no-speed skips timing)."),
    out: Path = typer.Option(Path("runs/compare"), help="Folder for compare.json and compare.png."),
    device: str = typer.Option(D.device, help="cpu, cuda, mps or auto (experiments run and speed)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Compare runs: parameters, validation loss, needle recall per condition, capacity, pattern similarity,
    usage evenness and training throughput against --slots 0, side by side."""
    paths = list(run_dirs or [])
    resolved = {Path(p).resolve() for p in paths}
    if Path(out).resolve() in resolved or (Path(out) / runs.CONFIG).is_file():
        raise InputError(f"--out {out} is a run folder; compare writes its own files elsewhere (e.g. --out runs/compare)")
    if facts != D.facts:  # named by the user: refused at once if unusable, even where no needle has to run
        check_facts_file(facts)
    check_out_folder(out)
    check_outputs(out, (COMPARE_JSON, COMPARE_PNG), "compare", force)
    settings = CompareSettings(facts=facts, run_missing=run_missing, speed=speed, speed_seconds=speed_seconds, device=device)
    with holding(out):
        with console.status("compare: reading runs") as status:
            result = compare_runs(paths, settings, progress=lambda msg: status.update(f"compare: {msg}"))
        doc = result.to_dict()
        files = _save(doc, Path(out))
    _print(doc)
    console.print("wrote " + ", ".join(files.values()), highlight=False, soft_wrap=True)
    if json_out:
        print_json({**doc, "files": files})


def _save(doc: dict, out: Path) -> dict:
    from imm_cli.plots.compare import plot_compare

    out.mkdir(parents=True, exist_ok=True)
    with runs.locked(out):
        files = {"json": str(out / COMPARE_JSON), "plot": str(out / COMPARE_PNG)}
        plot_compare(doc, out / COMPARE_PNG)
        runs.atomic_write_json(out / COMPARE_JSON, {**doc, "files": files})
        mark_outputs(out, [COMPARE_JSON, COMPARE_PNG], "compare")
    return files


# --- the table: one column per run ------------------------------------------------------------------
def _missing(r: dict, exp: str) -> str:
    st = r["status"].get(exp, NOT_RUN)
    return NONE if st == "no memory" else NOT_RUN if st == NOT_RUN else st


def _pair(a, b, digits: int = 2) -> str:
    return f"{fmt(a, digits)} / {fmt(b, digits)}"


def _rows(doc: dict) -> list[tuple[str, list[str]]]:
    rs = doc["runs"]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, cell) -> None:
        rows.append((label, [cell(r) for r in rs]))

    def per(exp: str, cell):  # a cell from one experiment's figures, or why there are none
        return lambda r: cell(r[exp]) if r[exp] is not None else _missing(r, exp)

    add("memory", lambda r: f"{r['memory']['kind']}, {r['memory']['slots']} slots" if r["memory"]["slots"] else "none (--slots 0)")
    add("steps trained", lambda r: str(r["train"]["step"]) if r["train"]["step"] is not None else "-")
    add("parameters", lambda r: f"{r['train']['params']:,}" if r["train"]["params"] is not None else "-")
    add("memory parameters (share)", lambda r: f"{r['train']['memory_params']:,} ({100 * r['train']['memory_share']:.1f}%)"
        if r["train"]["memory_share"] is not None else "-")
    add("val loss, memory carried / ablated (nats/byte)", lambda r: _pair(r["train"]["val_loss"], r["train"]["val_loss_ablated"], 3))
    add("synthetic-fact bytes right, memory / ablated", lambda r: _pair(r["train"]["recall_acc"], r["train"]["recall_acc_ablated"]))
    conds = [c for c in CONDITIONS if any(r["needle"] and c in r["needle"]["conditions"] for r in rs)] or list(CONDITIONS)
    needles = [r["needle"] for r in rs if r["needle"]]
    headline = {n.get("placement") for n in needles}  # the placement the conditions were measured in
    where = f" ({headline.pop()} placement)" if len(headline) == 1 and None not in headline else ""
    for c in conds:
        add(f"needle {LABEL.get(c, c)}{where}: exact / recall@1",
            per("needle", lambda n, c=c: _pair(n["conditions"][c].get("exact_match"), n["conditions"][c].get("recall_at_1"))
                if c in n["conditions"] else "-"))
    for p in sorted({p for n in needles for p in n["placements"] if not (where and p == n.get("placement"))}):
        for c in [c for c in CONDITIONS if any(r["needle"] and c in r["needle"]["placements"].get(p, {}) for r in rs)]:
            add(f"needle {LABEL.get(c, c)} ({p} placement): exact / recall@1",
                per("needle", lambda n, p=p, c=c: _pair(n["placements"][p][c].get("exact_match"), n["placements"][p][c].get("recall_at_1"))
                    if c in n["placements"].get(p, {}) else "-"))
    for name in sorted({k for r in rs if r["needle"] for k in r["needle"]["curves"]}):
        add(f"needle {name}: memory exact by x (best control)", per("needle", lambda n, k=name: _curve_cell(n["curves"].get(k))))
    add("pattern similarity s_t, mean ± std", per("store", lambda s: f"{fmt(s['mean'])} ± {fmt(s['std'])}"))
    for c in STORE_CONTROLS:
        add(f"  control: {CONTROL_LABEL[c]}", per("store", lambda s, c=c: fmt(s["controls"][c]["mean"]) if s["controls"][c]["mean"] is not None
                                                   else "undefined"))
    add("slot-to-slot cosine", per("store", lambda s: fmt(s["slot_cosine"])))
    add("usage entropy (1 = even)", per("usage", lambda u: fmt(u["entropy"])))
    add("usage min/max ratio", per("usage", lambda u: fmt(u["min_max_ratio"])))
    add("dead slots", per("usage", lambda u: f"{u['dead_slots']} of {u['slots']}" if u["dead_slots"] is not None else "-"))
    if any(r["recall"] for r in rs):
        add("recall, all facts in one memory: exact, memory / fresh",
            per("recall", lambda c: _pair((c["conditions"].get("memory") or {}).get("exact_match"),
                                          (c["conditions"].get("fresh") or {}).get("exact_match"))))
    add("training throughput vs --slots 0", lambda r: _speed_cell(r))
    return rows


def _curve_cell(c: dict | None) -> str:
    if not c:
        return "-"
    mem = c["exact_match"].get("memory")
    controls = [max((y for y in ys if y is not None), default=None) for k, ys in c["exact_match"].items() if k != "memory"]
    head = " ".join(f"{x:g}:{fmt(y, 2)}" for x, y in zip(c["x"], mem)) if mem else "-"
    ctl = [v for v in controls if v is not None]
    return f"{head} ({fmt(max(ctl), 2)})" if ctl else head


def _speed_cell(r: dict) -> str:
    s = r["speed"]
    if s is None:
        return _missing(r, "speed")
    if not s.get("measured"):
        return f"{s['ratio']:.2f} (itself)"
    interval = s.get("ratio_interval")  # compare.json files from before it have none
    spread = f", 95% {interval[0]:.2f} to {interval[1]:.2f}" if interval else ""
    return f"{s['ratio']:.2f} ({s['ms_per_step']:.1f} vs {s['ms_per_step_slots0']:.1f} ms/step{spread})"


def _print(doc: dict) -> None:
    facts = {str((r["needle"] or {}).get("facts_file")) for r in doc["runs"] if r["needle"]}
    needle = f"needle on {', '.join(sorted(facts))}" if facts else "no needle results"
    t = Table(title=escape(f"imm compare: {len(doc['runs'])} run(s); {needle}"))
    t.add_column("figure")
    for r in doc["runs"]:
        t.add_column(Text(r["name"]), justify="right")
    for label, cells in _rows(doc):  # Text: names and kinds come from files, never read as markup
        t.add_row(Text(label), *map(Text, cells))
    console.print(t)
    for r in doc["runs"]:
        for n in r["notes"]:
            console.print(f"note ({r['name']}): {n}", highlight=False, markup=False)
    for n in doc["notes"]:
        console.print(f"note: {n}", highlight=False, markup=False)
