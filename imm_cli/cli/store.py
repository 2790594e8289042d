"""`imm store`: the pattern storage test (does the memory state resemble what it was shown?)."""

from __future__ import annotations

import importlib
import inspect
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from imm_cli import runs
from imm_cli.errors import InputError
from imm_cli.cli.common import (_clean, check_out_folder, check_outputs, check_seed, console, fmt, handle_errors, holding,
                                mark_outputs, print_json, safe, with_options)

STORE_JSON = "store.json"
USAGE_JSON = "usage.json"
COMBINED_PNG = "optimal_config_results.png"
STORE_PNG = "pattern_similarity.png"
USAGE_PNG = "slot_usage_heatmap.png"

RUN_HELP = "Run folder made by `imm train` (it must have memory: --slots 1 or more)."
SEQ_HELP = "Consecutive sequences of the model's block size, memory carried across them with updates on."
RANDOM_HELP = "Uniform random bytes instead of the validation text (the notes' original setting)."
SEED_HELP = "Seed of the start in the validation split, the random tokens and the random control."
OUT_HELP = "Folder for the plots and the JSON result [default: the run folder]."
FORCE_HELP = "Replace files of the same names in --out that imm did not write."
KNN_LM_HELP = ("Mix the episodic memory's sharp read into the output with this fixed weight instead of the run's "
               "(--memory-knn-lm; 0 = the model's own distribution alone): inference only.")
KNN_EXACT_HELP = ("The mix's weight for stored entries whose context matches exactly, instead of the run's "
                  "(--memory-knn-exact; 0 = --knn-lm for every entry): inference only.")
FAR_WEIGHT_HELP = ("The episodic memory's far key weight, instead of the run's (--memory-far-weight; 0 = off): "
                   "inference only.")
MEMORY_SIZE_HELP = ("The memory's budget in entries, instead of the run's (--memory-size; episodic and knn): retention "
                    "acts at inference only, so the same weights measure what any budget keeps.")
FACTS_HELP = "Facts file, one per line; the cue is the first two words (e.g. examples/facts.txt)."


def _declare(specs: list[tuple]) -> list[inspect.Parameter]:
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind) for name, kind, opt in specs]


# recall's and needle's shared options, declared once: --run and --facts first, then the command's
# own options, then --out, --device, --knn-lm, --knn-exact, --far-weight, --memory-size, --force and --json. The
# command takes them as keyword-only parameters of the same names, the inference overrides
# (--knn-lm, --knn-exact, --far-weight, --memory-size) as **inference.
with_fact_options = with_options(
    _declare([("run", Path, typer.Option(..., help="Run folder made by `imm train` (with memory).")),
              ("facts", Path, typer.Option(..., help=FACTS_HELP))]),
    _declare([("out", Optional[Path], typer.Option(None, help="Folder for the JSON result and the plots [default: the run folder].")),
              ("device", str, typer.Option("cpu", help="cpu, cuda, mps or auto.")),
              ("knn_lm", Optional[float], typer.Option(None, "--knn-lm", help=KNN_LM_HELP)),
              ("knn_exact", Optional[float], typer.Option(None, "--knn-exact", help=KNN_EXACT_HELP)),
              ("far_weight", Optional[float], typer.Option(None, "--far-weight", help=FAR_WEIGHT_HELP)),
              ("memory_size", Optional[int], typer.Option(None, "--memory-size", help=MEMORY_SIZE_HELP)),
              ("force", bool, typer.Option(False, "--force", help=FORCE_HELP)),
              ("json_out", bool, typer.Option(False, "--json", help="Print one JSON document on stdout."))]))


# --- shared by store and usage ---------------------------------------------------------------------
def check_out(run: Path, out: Optional[Path], command: str, names: tuple[str, ...], force: bool = False,
              needs_data: bool = True) -> Path:
    """Before any work: the run folder (and, when the experiment reads text, the data it was trained on),
    then the output folder (default: the run folder) and the files the command will write there."""
    runs.read_config(run)
    if needs_data:
        runs.check_data(run, resume=False)
    flag = "--run" if out is None else "--out"
    out = run if out is None else out
    check_out_folder(out, flag)
    check_outputs(out, names, command, force, flag)
    return out


@contextmanager
def open_with_facts(run: Path, facts: Path, out: Optional[Path], command: str, names: tuple[str, ...], force: bool,
                    device: str, seed: int, inference: Optional[dict] = None):
    """What recall and needle do first: check the seed, the run, the output folder and the facts file
    before any work; then, holding the output folder, open the run and its facts.
    Yields (output folder, model, held-out text, facts); `inference` overrides the run's kNN-LM weights
    far key and budget (knn_lm, knn_exact, far_weight, memory_size: experiments.setup.set_inference)."""
    from imm_cli.experiments.setup import check_far_weight, check_knn_lm, check_memory_size, open_facts, open_run, set_inference
    from imm_cli.facts import load_facts

    check_seed(seed)
    inference = {k: v for k, v in (inference or {}).items() if v is not None}
    check_knn_lm(inference.get("knn_lm"))
    check_knn_lm(inference.get("knn_exact"), "--knn-exact")
    check_far_weight(inference.get("far_weight"))
    out_dir = check_out(run, out, command, names, force)
    check_memory_size(inference.get("memory_size"), runs.load_model_config(run).memory)  # its kind and slots
    load_facts(facts)  # the file and its lines (whether they fit the model: open_facts)
    with holding(out_dir):
        model, _, text = open_run(run, device)
        set_inference(model, **inference)
        yield out_dir, model, text, open_facts(facts, model)


def save_results(doc: dict, name: str, out: Path, plot, command: str, names: tuple[str, ...]) -> dict:
    """Write the plot and the JSON result, and the combined figure when both results are there."""
    out.mkdir(parents=True, exist_ok=True)
    with runs.locked(out):
        files = {}
        png = out / plot[0]
        plot[1](doc, png)
        files["plot"] = str(png)
        path = out / name
        files["json"] = str(path)
        combined = _combined(doc, name, out)
        if combined:
            files["combined"] = str(combined)
        runs.atomic_write_json(path, _clean({**doc, "files": files}))
        mark_outputs(out, [n for n in names if (out / n).exists()], command)
    return files


def _combined(doc: dict, name: str, out: Path) -> Path | None:
    other_name = USAGE_JSON if name == STORE_JSON else STORE_JSON
    other_path = out / other_name
    if not other_path.is_file():
        return None
    try:
        other = json.loads(other_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        console.print(f"[yellow]warning:[/] {escape(str(other_path))} is unreadable; {COMBINED_PNG} not drawn")
        return None
    if not isinstance(other, dict) or Path(str(other.get("run"))).resolve() != Path(doc["run"]).resolve():
        other_run = other.get("run") if isinstance(other, dict) else None
        console.print(f"[yellow]warning:[/] {escape(str(other_path))} is from another run ({escape(str(other_run))}); {COMBINED_PNG} not drawn")
        return None
    from imm_cli.plots.store_usage import plot_combined

    store, usage = (_clean(doc), other) if name == STORE_JSON else (other, _clean(doc))
    path = out / COMBINED_PNG
    try:
        plot_combined(store, usage, path)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        console.print(f"[yellow]warning:[/] {escape(str(other_path))} does not look like an imm result ({e.__class__.__name__}); {COMBINED_PNG} not drawn")
        return None
    return path


def memory_rows(t: Table, r) -> None:
    m = r.memory
    t.add_row("memory", f"{m['kind']}, {m['slots']} slots in block {m['layer']}, width {m['width']}")
    t.add_row("memory share of parameters", f"{100 * m['memory_share']:.2f}% ({m['memory_params']:,} of {m['params']:,})")
    t.add_row("sequences", f"{r.sequences} x {r.block_size} bytes, batch 1, memory carried")
    t.add_row("source", safe(r.source))


def files_line(files: dict) -> None:
    console.print(safe("wrote " + ", ".join(files.values())), highlight=False, soft_wrap=True)


# --- the command ---------------------------------------------------------------------------------
def experiment_command(experiment: str, name: str, png: str, plot: str, show, json_help: str, doc: str):
    """`imm store` or `imm usage`: the same options around one experiment. `experiment` and `plot` are
    "module:function", imported when the command runs (so `imm --help` stays fast)."""
    def imported(where: str):
        module, fn = where.split(":")
        return getattr(importlib.import_module(module), fn)

    def command(
        run: Path = typer.Option(..., "--run", help=RUN_HELP),
        sequences: int = typer.Option(50, help=SEQ_HELP),
        random_tokens: bool = typer.Option(False, "--random-tokens", help=RANDOM_HELP),
        seed: int = typer.Option(0, help=SEED_HELP),
        out: Optional[Path] = typer.Option(None, help=OUT_HELP),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
        json_out: bool = typer.Option(False, "--json", help=json_help),
    ) -> None:
        run_and_report(imported(experiment), run, out, name, (png, imported(plot)), show, json_out, force,
                       sequences=sequences, random_tokens=random_tokens, seed=seed)
    command.__doc__ = doc
    return handle_errors(command)


def run_and_report(experiment, run: Path, out: Optional[Path], name: str, plot, show, json_out: bool, force: bool,
                   **kwargs) -> None:
    """What store and usage do around their experiment: check the run and --out, run, save JSON and plots, print."""
    from imm_cli.experiments.store import MAX_SEQUENCES

    command = name.removesuffix(".json")
    if not 2 <= kwargs["sequences"] <= MAX_SEQUENCES:  # the "another sequence" control needs a second one
        raise InputError(f"--sequences must be between 2 and {MAX_SEQUENCES} (got {kwargs['sequences']})")
    check_seed(kwargs["seed"])
    names = (name, plot[0], COMBINED_PNG)
    out_dir = check_out(run, out, command, names, force, needs_data=not kwargs["random_tokens"])
    with holding(out_dir):
        r = experiment(run, **kwargs)
        doc = r.to_dict()
        files = save_results(doc, name, out_dir, plot, command, names)
    show(r)
    for n in r.notes:
        console.print(safe(f"note: {n}"), highlight=False)
    files_line(files)
    if json_out:
        print_json({**doc, "files": files})


def _pm(mean, std) -> str:
    return "undefined" if mean is None or mean != mean else f"{mean:.3f} ± {std:.3f}"


def _table(r) -> None:
    t = Table(title=f"imm store: {r.run}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    memory_rows(t, r)
    t.add_row("pattern similarity s_t, mean ± std", _pm(r.mean, r.std))
    t.add_row("s_t min / max", f"{fmt(r.min)} / {fmt(r.max)}")
    t.add_row("best slot, mean", fmt(r.best_slot_mean))
    tr = r.trend
    t.add_row(f"trend: first {tr['window']} -> last {tr['window']} sequences", f"{fmt(tr['first'])} -> {fmt(tr['last'])} ({tr['delta']:+.3f})")
    t.add_row("slot-to-slot cosine (final state, mean of pairs)", fmt(r.slot_cosine))
    for name, label in (("initial", "control: memory in its initial state"), ("random", "control: random unit vectors"),
                        ("other_sequence", "control: slots vs another sequence")):
        c = r.controls[name]
        t.add_row(label, _pm(c["mean"], c["std"]))
    t.add_row("empty slots (first / last sequence)", f"{r.empty_slots[0]} / {r.empty_slots[-1]}")
    t.add_row("NaN/inf seen", "yes: " + "; ".join(r.nonfinite_where[:3]) if r.nonfinite else "no")
    console.print(t)


store = experiment_command(
    "imm_cli.experiments.store:pattern_storage", STORE_JSON, STORE_PNG, "imm_cli.plots.store_usage:plot_pattern_similarity", _table,
    "Print one JSON document with every figure and the per-sequence series on stdout.",
    "Pattern storage test: cosine between memory slots and each sequence's mean hidden state, with controls.")
