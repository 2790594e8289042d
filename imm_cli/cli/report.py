"""`imm report`: one self-contained HTML page of one or more run folders (side by side)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from imm_cli.cli.common import check_out_folder, console, handle_errors, print_json
from imm_cli.errors import InputError


@handle_errors
def report(
    runs: List[Path] = typer.Argument(..., metavar="RUN", help="Run folders made by `imm train` (or sweep folders made by `imm sweep`); several are shown side by side."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write [default: RUN/report.html for one run, report.html for several]."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if it is not a page imm report wrote."),
    json_out: bool = typer.Option(False, "--json", help='Print {"report": PATH} on stdout.'),
) -> None:
    """Write one HTML page (no network, images embedded) with the run's configuration, training curve and every experiment found, controls beside each figure."""
    from imm_cli import runs as run_files
    from imm_cli.report import build_report, check_folder, is_report

    for r in runs:  # before --out, whose default lies inside the first
        check_folder(r)
    if out is None:
        out = runs[0] / "report.html" if len(runs) == 1 else Path("report.html")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the HTML file to write")
    if out.exists() and not force and not is_report(out):
        raise InputError(f"--out {out} exists and is not a page imm report wrote; choose another file or pass --force to replace it")
    check_out_folder(out.parent)
    page = build_report(runs, generated_by=" ".join(["imm report", *map(shlex.quote, map(str, runs))]))
    out.parent.mkdir(parents=True, exist_ok=True)
    run_files.atomic_write_bytes(out, page.encode("utf-8"))
    console.print(f"report: {escape(str(out))} ({len(page) / 1e6:.1f} MB, {len(runs)} folder{'s' if len(runs) > 1 else ''})",
                  highlight=False, soft_wrap=True)
    if json_out:
        print_json({"report": str(out)})
