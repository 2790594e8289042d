"""`imm train`: check flags, call imm_cli.train.train, show progress and a summary table."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from imm_cli import runs
from imm_cli.cli.common import check_out_folder, console, fmt, handle_errors, print_json, started_on_demand, with_options
from imm_cli.cli.flags import TRAIN_FLAGS
from imm_cli.config import FLAGS, RESUMABLE_FLAGS, ModelConfig, configs_from_flags, flag_values, to_dict
from imm_cli.errors import InputError


@handle_errors
@with_options(TRAIN_FLAGS)
def train(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, help="Run folder to create [default: runs/<memory>-s<slots>]."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder exactly where its last checkpoint stopped."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document with the final figures on stdout."),
    **flags,
) -> None:
    """Train a byte-level GPT with (or without: --slots 0) an Implicit Memory Module."""
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise InputError(f"--out {out} and --resume {resume} name different folders; a resumed run stays in its folder")
        out = resume
        model_cfg, train_cfg, saved_iters = _resume_configs(ctx, resume, flags["data"])
    else:
        saved_iters = None
        model_cfg, train_cfg = configs_from_flags({flag: _plain(flags[flag]) for flag in FLAGS})
        if out is None:
            mem = model_cfg.memory
            out = Path("runs") / (f"{mem.kind}-s{mem.slots}" if mem.slots else "s0")
        _check_new_out(out)
        if flags["data"] is not None:
            from imm_cli.data import read_text_file

            read_text_file(flags["data"], what="data file")  # checked before any folder is made
    from imm_cli.distributed import is_main_process
    from imm_cli.train import resolve_device, train as run_training

    resolve_device(train_cfg.device)  # --device cuda without one: refuse before writing
    if not is_main_process():  # under torchrun only process 0 prints (errors still reach stderr)
        run_training(model_cfg, train_cfg, out, resume=resume is not None)
        return
    result = _with_progress(lambda cb: run_training(model_cfg, train_cfg, out, resume=resume is not None, on_event=cb), saved_iters)
    _summary(result, model_cfg)
    if json_out:
        print_json({**result.to_dict(), "config": {"model": to_dict(model_cfg), "train": to_dict(train_cfg)}})
    if result.interrupted:
        # one unwrapped line, so the command can be copied whole
        console.print(escape(f"stopped at step {result.step}; checkpoint saved in {out}. Resume with: imm train --resume {out}"),
                      soft_wrap=True, highlight=False)
        raise typer.Exit(130)


def _check_new_out(out: Path) -> None:
    check_out_folder(out)  # refuses a folder another imm process writes, naming its pid
    if out.is_dir() and any(out.iterdir()):
        if (out / runs.CONFIG).exists():
            raise InputError(f"--out {out} already holds a run; continue it with --resume {out} or choose another --out")
        if all(p.name in (runs.TRAIN_STATE, runs.WEIGHTS, runs.METRICS, runs.LOCK) or p.name.startswith(runs.TMP_PREFIX)
               for p in out.iterdir()):
            raise InputError(f"--out {out} holds a run stopped before its first checkpoint was complete; "
                             f"delete that folder or choose another --out")
        raise InputError(f"--out {out} is not empty; choose an empty or new folder")


def _plain(value):
    """A flag's value as the configs hold it: enums by value, paths resolved (found again from any folder)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value.resolve())
    return value


def _resume_configs(ctx: typer.Context, run: Path, data: Optional[Path] = None):
    state = runs.check_resumable(run)  # every config field, weights, training state, writable: before any work
    saved_model = runs.load_model_config(run, strict=True)
    saved_train = runs.load_train_config(run, strict=True)
    # the data it was trained on, unchanged (size and sha256), or an explicit --data with the same content
    data_path = runs.check_data(run, data)
    saved = flag_values(saved_model, saved_train)
    for flag in FLAGS:
        if flag in RESUMABLE_FLAGS or flag == "data" or not _given(ctx, flag):
            continue
        given = _plain(ctx.params[flag])
        if given != saved[flag]:
            name = "--" + flag.replace("_", "-")
            raise InputError(f"{name} {given} disagrees with the run being resumed ({name} {saved[flag]} in {run / runs.CONFIG})")
    changes = {FLAGS[flag][1]: ctx.params[flag] for flag in RESUMABLE_FLAGS if _given(ctx, flag)}
    train_cfg = replace(saved_train, **changes, data=data_path).check(saved_model.memory)
    if state["step"] >= train_cfg.iters:
        raise InputError(f"{run} already trained {state['step']} steps (--iters {train_cfg.iters}); "
                         f"pass --iters above {state['step']} to go on")
    return saved_model, train_cfg, saved_train.iters


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the user typed this flag (not a default)."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", "") == "COMMANDLINE"


def _with_progress(run, saved_iters: int | None = None):
    """Progress of `run(on_event)`; saved_iters: a resumed run's --iters before this resume."""
    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TaskProgressColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[val]}"), TimeRemainingColumn(), console=console, transient=False,
    )
    task = None

    def on_event(e: dict) -> None:
        nonlocal task
        if e["type"] == "start":
            mem = f", memory {e['memory_params']:,} ({100 * e['memory_params'] / e['params']:.2f}%)" if e["memory_params"] else ""
            procs = f" x {e['processes']} processes" if e.get("processes", 1) > 1 else ""
            console.print(f"model: {e['params']:,} parameters{mem}; device {e['device']}{procs}, {e.get('precision', 'fp32')}"
                          + (", compiled" if e.get("compile") else "") + "; "
                          f"{e['episodes']} episodes x {e['segments']} segments per step"
                          + (f", {e['curriculum_episodes']} of them recall curriculum" if e["curriculum_episodes"] else ""))
            if e["step"]:
                console.print(f"resumed at step {e['step']:,}; training to step {e['iters']:,}")
                if saved_iters is not None and saved_iters != e["iters"]:
                    console.print(f"note: --iters {e['iters']} differs from the run's {saved_iters}: from step {e['step']} on, the "
                                  f"learning rate follows a {e['iters']}-step schedule (it jumps to that schedule's rate), so the "
                                  f"result differs from a run trained to {e['iters']} from the start; the same --iters resumes exactly",
                                  highlight=False, soft_wrap=True)
            if e.get("episode_path", "batched") != "batched":  # the slower exact loop: say so, and why
                console.print(f"episodes run segment by segment ({e['episode_path'].split(': ', 1)[-1]})")
            start_progress()
            task = progress.add_task("train", total=None, completed=e["step"], loss="-", tps="-", val="")
        elif e["type"] == "step" and task is not None:
            val = progress.tasks[0].fields["val"]
            if "val_loss" in e:
                val = f"val {e['val_loss']:.3f}"
                if e.get("val_loss_ablated") is not None and e["val_loss_ablated"] != e["val_loss"]:
                    val += f" (ablated {e['val_loss_ablated']:.3f})"
                if e.get("recall_acc") is not None:
                    val += f" recall {e['recall_acc']:.2f}/{e['recall_acc_ablated']:.2f}"
                console.log(f"step {e['step']}: {val}")
            progress.update(task, total=e["iters"], completed=e["step"], loss=f"{e['loss']:.3f}", tps=f"{e['tokens_per_s']:,.0f}", val=val)
        elif e["type"] == "warning":
            console.print(f"[yellow]warning:[/] {e['message']}")

    with started_on_demand(progress) as start_progress:
        return run(on_event)


def _summary(r, model_cfg: ModelConfig) -> None:
    t = Table(title=f"imm train: {r.run}", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")
    mem = model_cfg.memory
    t.add_row("memory", f"{mem.kind}, {mem.slots} slots" if mem.enabled else "none (--slots 0)")
    t.add_row("parameters", f"{r.params:,}")
    t.add_row("memory parameters", f"{r.memory_params:,}")
    t.add_row("memory share of parameters", f"{100 * r.memory_share:.2f}%")
    t.add_row("steps", str(r.step))
    t.add_row("final train loss", fmt(r.train_loss))
    t.add_row("validation loss, memory carried", fmt(r.val_loss))
    t.add_row("validation loss, memory ablated", fmt(r.val_loss_ablated))
    if r.recall_acc is not None:
        t.add_row("synthetic-fact answer bytes right, memory / ablated", f"{r.recall_acc:.3f} / {r.recall_acc_ablated:.3f}")
    t.add_row("training tokens/s (the whole run: evaluations and saves included)", f"{r.tokens_per_s:,.0f}")
    t.add_row("NaN/inf seen", "yes" if r.nonfinite else "no")
    console.print(t)
